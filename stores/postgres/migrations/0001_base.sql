-- Objects every later migration relies on: tenant isolation and delivery checkpoints.

-- Tenant isolation. A database role listed here is tenant-scoped: it sees a row of meterd's
-- tables and rollups only when the row's tenant is the session's `meterd.tenant` setting AND the
-- role is granted that tenant here. A role not listed here sees what its GRANTs allow.
CREATE TABLE meterd.tenant_roles (
    role_name name NOT NULL,
    tenant text NOT NULL,
    PRIMARY KEY (role_name, tenant)
);
ALTER TABLE meterd.tenant_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_grants ON meterd.tenant_roles FOR SELECT USING (role_name = current_user);
GRANT SELECT ON meterd.tenant_roles TO PUBLIC;

-- Whether the current role may see rows of tenant `p_tenant`. Both subqueries are uncorrelated,
-- so PostgreSQL evaluates them once per query, not per row. The body is parsed here, once (a
-- SQL-standard body), so no caller's search_path can change what its operators mean.
CREATE FUNCTION meterd.tenant_visible(p_tenant text) RETURNS boolean
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT NOT EXISTS (SELECT 1 FROM meterd.tenant_roles WHERE role_name = current_user)
        OR (p_tenant = current_setting('meterd.tenant', true)
            AND EXISTS (SELECT 1 FROM meterd.tenant_roles
                        WHERE role_name = current_user
                          AND tenant = current_setting('meterd.tenant', true)));
END;

-- Delivery checkpoints: for each meterd node, the position in its log up to which events are
-- in meterd.events. Advanced in the same transaction as the rows it covers, so a batch is in
-- the table exactly when the checkpoint says so.
CREATE TABLE meterd.sink_checkpoints (
    node_id text PRIMARY KEY,
    lsn bigint NOT NULL CHECK (lsn >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

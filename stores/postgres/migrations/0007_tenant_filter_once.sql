-- Tenant isolation evaluated once per query instead of once per row.
--
-- The views filtered rows with meterd.tenant_visible(tenant). PostgreSQL cannot inline a
-- function whose body has subqueries, so it ran the function (two lookups in
-- meterd.tenant_roles) for every row, and, the function not being marked parallel safe, ran
-- every query over the views in one process: a month's GROUP BY over meterd.events took 25
-- times as long as over meterd.events_data. The views now compare each row's tenant with two
-- uncorrelated scalar subqueries, which PostgreSQL evaluates once per query (InitPlans); a
-- security-barrier view still keeps its scan in one process. Who sees what is unchanged:
--   a role not listed in meterd.tenant_roles sees every tenant;
--   a listed role sees the tenant of its meterd.tenant setting, if it is granted that tenant.

-- Whether the current role sees every tenant: it is not tenant-scoped.
CREATE FUNCTION meterd.sees_every_tenant() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT NOT EXISTS (SELECT 1 FROM meterd.tenant_roles WHERE role_name = current_user);
END;

-- The tenant a tenant-scoped role sees in this session: its meterd.tenant setting when the role
-- is granted that tenant, else NULL (which no row's tenant equals).
CREATE FUNCTION meterd.visible_tenant() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT tenant FROM meterd.tenant_roles
    WHERE role_name = current_user
      AND tenant = current_setting('meterd.tenant', true);
END;

-- Kept for views of the database's own users; parallel safe as its parts are.
ALTER FUNCTION meterd.tenant_visible(text) PARALLEL SAFE;

-- Each of meterd's views over events and rollups, re-created with the new filter in place of
-- every meterd.tenant_visible(<column>). OR REPLACE keeps the views' grants, comments and the
-- views built on them.
DO $$
DECLARE
    v_view record;
    v_old text;
    v_new text;
BEGIN
    FOR v_view IN
        SELECT c.oid, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'meterd' AND c.relkind = 'v'
          AND c.relname IN ('events', 'usage_hourly', 'usage_daily')
    LOOP
        v_old := pg_get_viewdef(v_view.oid);
        v_new := regexp_replace(
            v_old,
            '(meterd\.)?tenant_visible\(([A-Za-z_][A-Za-z0-9_.]*)\)',
            '((SELECT meterd.sees_every_tenant()) OR \2 = (SELECT meterd.visible_tenant()))',
            'g');
        IF v_new = v_old THEN
            RAISE EXCEPTION 'meterd''s migration 7 found no tenant filter in the view meterd.%', v_view.relname;
        END IF;
        EXECUTE format('CREATE OR REPLACE VIEW meterd.%I WITH (security_barrier) AS %s',
                       v_view.relname, v_new);
    END LOOP;
END
$$;

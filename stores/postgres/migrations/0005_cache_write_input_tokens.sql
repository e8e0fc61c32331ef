-- llm.usage events carry cache_write_input_tokens: input tokens written to a provider's prompt
-- cache, billed above the input price. NULL for the events stored before it and for the other
-- types.
ALTER TABLE meterd.events_data ADD COLUMN cache_write_input_tokens bigint;

-- The view's `*` was expanded when it was created: created again, it shows the new column (at
-- the end, as in the table). Its grants stay.
CREATE OR REPLACE VIEW meterd.events WITH (security_barrier) AS
SELECT * FROM meterd.events_data WHERE meterd.tenant_visible(tenant);

-- Closed invoices: stored once, when a billing period is closed, as the exact bytes answered
-- then; every node answers them from here, byte for byte, ever after.
CREATE TABLE meterd.closed_invoices (
    tenant text NOT NULL,
    period text NOT NULL,
    body bytea NOT NULL,
    closed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, period)
);

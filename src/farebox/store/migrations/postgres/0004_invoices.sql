-- farebox store, version 0004: the invoices of X-Receipt card payments.

-- One row per invoice a 402 named. Both the reference and the Stripe PaymentIntent are unique:
-- one PaymentIntent pays for one invoice, and an invoice is consumed once by claiming
-- 'invoice/' || reference in `claims`. Expired invoices whose claim was never taken are pruned;
-- claimed ones are kept as the record of what their PaymentIntent paid for.
CREATE TABLE invoices (
    reference TEXT PRIMARY KEY,
    payment_intent TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    resource TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Pruning reads expired invoices oldest first.
CREATE INDEX invoices_expires_at ON invoices (expires_at);

-- callgate 0006: read-only API tokens (dashboards, support staff).
--
-- A read-only token has the scope of an admin or a reseller token for reading, and
-- every write it attempts is refused (HTTP 403) by the API before any work is done.
ALTER TABLE api_tokens ADD COLUMN read_only boolean NOT NULL DEFAULT false;

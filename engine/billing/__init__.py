"""Accounting: rating at hangup, funds reservations, CDRs, statements, low-balance alerts (docs/accounting.md)."""

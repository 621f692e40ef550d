"""Accounting: rating at hangup, funds reservations, CDRs, statements, low-balance alerts.

See docs/accounting.md.
"""

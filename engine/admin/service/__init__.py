"""The one service layer of customer management: rules, validation, transactions, audit.

The CLI and the HTTP API both call :class:`AdminService`; neither holds a
business rule. Every method that writes runs in one transaction that also
writes the audit log; nothing is half-done on error.

Scope: an :class:`Actor` is the admin (``reseller_id is None``) or a reseller,
who sees and changes only the accounts below it (its subtree, sub-resellers'
customers included). An account outside the scope is reported as not found,
exactly like one that does not exist.

Accounts here are customers and providers (ASTPP's customer module); the
account number is the handle, unique among accounts that are not deleted.

Secrets: passwords and PINs are stored as scrypt hashes and never returned;
secrets the server generates (password, PIN, SIP password) are returned once,
by the call that generated them. SIP device passwords are stored as given
(FreeSWITCH needs them for digest authentication) but never returned either.

Balances follow callgate's convention: ``balance`` is what the customer holds
(negative = debt), prepaid and postpaid alike; available credit is
``balance + credit_limit``.

The service is split by resource: ``base`` (scope, audit, child-table writes), ``form`` (the
customer form's rules), ``claims`` (the ownership rule of identification data), ``accounts``,
``grid`` (list/search/export), ``bulk`` (mass create, CSV import), ``devices``, ``ipmap``,
``callerids``, ``dids``, ``extras`` (speed dials, blocked codes, alert threshold, trunks),
``balance``, ``audit`` and ``tokens``. :class:`AdminService` puts them together; import it from
here.
"""

from __future__ import annotations

from engine.admin.service.accounts import AccountsMixin
from engine.admin.service.audit import AuditMixin
from engine.admin.service.balance import BalanceMixin
from engine.admin.service.base import ACCOUNT_KINDS, Actor, NoProgress, Progress
from engine.admin.service.bulk import BulkMixin
from engine.admin.service.callerids import CallerIdsMixin
from engine.admin.service.devices import DevicesMixin
from engine.admin.service.dids import DidsMixin
from engine.admin.service.extras import ExtrasMixin
from engine.admin.service.grid import GridMixin
from engine.admin.service.ipmap import IpMapMixin
from engine.admin.service.tokens import TOKEN_PREFIX, TokensMixin, token_digest

__all__ = ["ACCOUNT_KINDS", "TOKEN_PREFIX", "Actor", "AdminService", "NoProgress", "Progress", "token_digest"]


class AdminService(
    BulkMixin,
    AccountsMixin,
    GridMixin,
    DevicesMixin,
    IpMapMixin,
    CallerIdsMixin,
    DidsMixin,
    ExtrasMixin,
    BalanceMixin,
    AuditMixin,
    TokensMixin,
):
    """Customer management for one actor over one connection (autocommit; see the package docstring)."""

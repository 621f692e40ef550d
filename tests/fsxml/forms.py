"""Request bodies as mod_xml_curl builds them (xml_url_fetch: the five basic fields, then the params)."""

from __future__ import annotations

from urllib.parse import quote


def form(section: str, tag_name: str = "", key_name: str = "", key_value: str = "", **params: str) -> str:
    # FreeSWITCH writes the basic fields unencoded and url-encodes each param value.
    basic = f"hostname=fs1&section={section}&tag_name={tag_name}&key_name={key_name}&key_value={key_value}"
    return basic + "".join(f"&{name}={quote(value, safe='')}" for name, value in params.items())


def sip_auth(user: str, domain: str, realm: str | None = None, ip: str = "198.51.100.9") -> str:
    """sofia_reg_parse_auth -> switch_xml_locate_user_merged("id", user, domain_name, ip)."""
    return form(
        "directory",
        "domain",
        "name",
        domain,
        action="sip_auth",
        sip_profile="internal",
        sip_user_agent="softphone/1.0",
        sip_auth_username=user,
        sip_auth_realm=domain if realm is None else realm,
        sip_auth_nonce="8f6bd8c8-0000",
        sip_auth_uri=f"sip:{domain}",
        sip_auth_response="00" * 16,
        sip_auth_method="REGISTER",
        key="id",
        user=user,
        domain=domain,
        ip=ip,
    )


def gateways(profile: str, domain: str = "") -> str:
    """launch_sofia_worker_thread: a profile's <domains> entry with parse="true"."""
    tag = "domain" if domain else ""
    return form("directory", tag, "name" if domain else "", domain, purpose="gateways", profile=profile)


def sofia_conf(profile: str = "") -> str:
    return form("configuration", "configuration", "name", "sofia.conf", profile=profile)

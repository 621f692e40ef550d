"""SIPp scenario suite for a real FreeSWITCH in front of callgate (docs/real-switch-lab.md)."""

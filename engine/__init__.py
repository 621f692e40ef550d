"""callgate: call authorization for FreeSWITCH."""

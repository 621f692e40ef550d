"""The chaos suite (issue 17): real processes on loopback under steady load, faults injected one
after another, and for each: calls bridged without a complete check (must be 0), calls wrongly
refused and for how long, time to recover, counters against the switches' live channels after one
reconciliation, and the ledger equation for every account.

    python -m loadtest.chaos [--short] [--out DIR] [--fault NAME ...]

See docs/high-availability.md ("The chaos suite") for what is measured and how.
"""

"""Scenario bodies for integration tests ("tests as code", issue 9).

Each ``case_*`` function runs INSIDE a sandbox (tests/sandbox.py) as its fake hypervisor
host, starts its own stand-in VMs, attacks, runs nsmount, and prints one JSON line of
observations; the pytest files assert on that JSON.
"""

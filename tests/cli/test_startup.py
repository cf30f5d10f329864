"""``farebox --help`` starts without loading what only a command needs: every command module
imports the agent, the server, the stores, the ledgers and py-evm when it runs."""

import json
import subprocess
import sys

# Packages of farebox, and top-level libraries, that the help must not load.
NOT_AT_START = (
    "farebox.agent",
    "farebox.config",
    "farebox.dev",
    "farebox.facilitator",
    "farebox.ledgers",
    "farebox.server",
    "farebox.store",
)
LIBRARIES = {"eth", "eth_tester", "evm", "httpx", "psycopg", "redis", "sqlite3", "uvicorn", "web3"}


def test_help_loads_no_agent_server_store_or_chain() -> None:
    code = (
        "import json, sys\n"
        "sys.argv = ['farebox', '--help']\n"
        "from farebox.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: farebox" in out.stdout
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "farebox.cli.serve" in loaded  # every command is registered, its module imported
    early = [
        name
        for name in loaded
        if name.split(".")[0] in LIBRARIES
        or any(name == p or name.startswith(p + ".") for p in NOT_AT_START)
    ]
    assert early == []

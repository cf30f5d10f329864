"""The facilitator service is a face of its own: serving /verify and /settle loads no server module."""

import json
import subprocess
import sys


def test_the_facilitator_service_imports_nothing_from_the_server() -> None:
    code = (
        "import json, sys\n"
        "import farebox.facilitator.service\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('farebox.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "farebox.facilitator.service" in loaded
    assert [m for m in loaded if m == "farebox.server" or m.startswith("farebox.server.")] == []
    assert "farebox.ops.reconcile" in loaded  # the lifespan's reconciler, from below the faces

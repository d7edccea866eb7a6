"""core/ is bookkeeping over integers: importing it must not pull in torch."""

import subprocess
import sys


def test_core_request_and_config_import_without_torch():
    code = (
        "import sys, pagedllm.core, pagedllm.request, pagedllm.config;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

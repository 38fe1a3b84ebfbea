"""`scripts/serve.py` with the tests' 14-dim bimanual embodiment (`fixtures_serving.ALOHA_TEST_SPEC`)
in the dataset registry, as a user adds an entry to `oxe_registry.OXE_DATASETS` for their robot.

  python tests/serve_test_embodiment.py --bundle=... (serve.py's flags)
"""

import runpy

import fixtures_serving

if __name__ == "__main__":
  fixtures_serving.register_test_embodiment()
  runpy.run_path(str(fixtures_serving.REPO / "scripts" / "serve.py"), run_name="__main__")

"""The core must import with trl, transformers and verl unavailable."""
import subprocess
import sys
import textwrap


def test_core_and_methods_import_without_engines():
    code = textwrap.dedent(
        """
        import sys
        import torch  # torch itself may import numpy; the core must not need anything else
        BLOCKED = ("trl", "transformers", "verl", "ray", "accelerate", "deepspeed", "vllm", "datasets", "math_verify")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import rlvr_entropy
        import rlvr_entropy.core, rlvr_entropy.methods, rlvr_entropy.controllers, rlvr_entropy.stats
        from rlvr_entropy.methods.siren import peak_entropy_mask, selected_entropy
        from rlvr_entropy.methods.steer import steer_token_weights
        names = rlvr_entropy.available_methods()
        assert len(names) >= 12, names
        for n in names:
            rlvr_entropy.make_method(n)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok", len(names))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_blocker_really_blocks():
    """Guard against a blocker that blocks nothing (a test that cannot fail)."""
    code = textwrap.dedent(
        """
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "json":
                    raise ImportError("blocked")
        sys.modules.pop("json", None)
        sys.meta_path.insert(0, Blocker())
        try:
            import json
        except ImportError:
            print("blocked")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "blocked" in r.stdout

"""Put this folder first on PYTHONPATH to run as on a machine without some packages: every import of
a name listed in AND_BLOCK_IMPORTS (comma-separated; default the optional ones: DALI, faiss, wandb,
submitit) fails as if it were not installed."""
import os
import sys

BLOCKED = tuple(n for n in os.environ.get("AND_BLOCK_IMPORTS", "nvidia.dali,faiss,wandb,submitit").split(",") if n)


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named '{name}' (blocked by tests/blocked_imports)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())

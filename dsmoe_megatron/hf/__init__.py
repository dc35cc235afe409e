"""Hugging Face side of DeepSeekMoE: configuration/modeling files in the deepseek-moe-16b-base format.

Those two modules are also shipped as remote code next to exported weights; ``mapping`` maps
Megatron tensors and config fields onto that format. Importing this package does not import
transformers.
"""

import json
import shutil
from pathlib import Path

REMOTE_CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


def write_hf_remote_code(out_dir: str | Path) -> list[Path]:
    """Copy the remote-code files into ``out_dir`` and return their paths.

    If ``out_dir/config.json`` already exists, its ``auto_map`` is set so that
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` finds them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    written = [Path(shutil.copyfile(here / name, out_dir / name)) for name in REMOTE_CODE_FILES]
    config_path = out_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["auto_map"] = AUTO_MAP
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written

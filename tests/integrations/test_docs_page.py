"""The code blocks of docs/integrations.md run as written (in order, in one namespace) and the page names what
the package exports."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mallowspo_fast.integrations.trl as mtrl
from mallowspo_fast.integrations import openrlhf, trl_head, trl_utils, verl

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_page_code_blocks_run(tmp_path, monkeypatch):
    text = PAGE.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) == 7
    monkeypatch.chdir(tmp_path)  # the trainers' output_dir
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), namespace)  # noqa: S102
    assert namespace["trainer"].state.global_step == 1
    assert namespace["sft"].state.global_step == 1 and namespace["sft"].model._mpf_head_settings is not None
    assert isinstance(namespace["trainer"], namespace["MyTrainer"])
    logs = namespace["logs"]  # the MallowsDPOTrainer example's last step
    for key in ("loss", "rewards/margins", "dispersion/neg_log_mean"):
        assert math.isfinite(logs[key]), key


def test_page_names_the_public_functions_and_the_pinned_version():
    text = PAGE.read_text(encoding="utf-8")
    for module in (openrlhf, verl, trl_utils, trl_head):
        for name in module.__all__:
            if name != "masked_sum":
                assert name in text, name
    for name in ("MallowsDPOTrainer", "MallowsDPOConfig", "patch_dpo_trainer", "patch_trainer",
                 *mtrl.OUR_LOSS_TYPES):
        assert name in text, name
    assert f"TRL {mtrl.TESTED_TRL_VERSION}" in text
    assert "trl==" + mtrl.TESTED_TRL_VERSION in text
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text(encoding="utf-8")
    assert '"trl==' + mtrl.TESTED_TRL_VERSION + '"' in setup  # the extra pins the tested version

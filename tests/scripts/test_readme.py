import re

from tests.utils import REPOSITORY


README = REPOSITORY / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no Python example"
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoints into the working directory
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "selfie-cifar10-classifier" / "model.safetensors").is_file()
    assert (tmp_path / "selfie-p.safetensors").is_file()  # the timm export, which timm loaded strictly

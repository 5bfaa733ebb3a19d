"""The repository's figures against the logs behind them: submission.json's numbers each appear in a
log it names, every log the README and docs/ cite is in logs/, and every link to a heading finds
it."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"logs/([A-Za-z0-9_.\-]+\.(?:txt|json))")
# the README's examples
WRITTEN_BY_RUNS = {"demo.txt", "demo.json", "seed1337.txt", "seed1337.json"}
# results tables name a log without logs/ and .txt
BARE = re.compile(r"`((?:proxy|cpu)_[A-Za-z0-9_]+)`")


def test_submission_figures_are_in_the_logs_it_names():
    sub = json.loads((ROOT / "submission.json").read_text())
    names = {sub["log"].removeprefix("logs/")} | set(CITED.findall(sub["figures_are"]))
    text = "\n".join((ROOT / "logs" / n).read_text() for n in sorted(names))
    for key in ("val_bpb", "val_loss", "sliding_val_bpb", "pre_quant_val_bpb", "roundtrip_val_bpb"):
        assert f":{sub[key]:.8f}" in text, (key, sub[key], sorted(names))
    assert f"Total submission size int6+zstd: {sub['bytes_total']} bytes" in text
    assert f"Serialized model int6+zstd: {sub['bytes_model_int6_zstd']} bytes" in text
    assert f"Code size: {sub['bytes_code']} bytes" in text
    assert re.search(rf"^step:{sub['step']}/\d+ val_loss:.* step_avg:{sub['step_avg_ms']:.2f}ms$",
                     text, re.M)
    assert sub["score"] in ("legal_ttt_exact", "final_int6_sliding_window_exact",
                            "final_int6_roundtrip_exact")
    assert sub["bytes_total"] <= 16_000_000


def test_every_cited_log_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = {(d.name, n) for d in docs for n in CITED.findall(d.read_text())
               if n not in WRITTEN_BY_RUNS and not (ROOT / "logs" / n).is_file()}
    missing |= {(d.name, n) for d in docs for n in BARE.findall(d.read_text())
                if not any((ROOT / "logs" / f"{n}{ext}").is_file() for ext in (".txt", ".json"))}
    assert not missing, sorted(missing)


def anchor(heading: str) -> str:
    """A heading's GitHub anchor: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_into_the_docs_names_a_heading_there():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    headings = {d: {anchor(line.lstrip("#")) for line in d.read_text().splitlines()
                    if line.startswith("#")}
                for d in docs}
    broken = []
    for d in docs:
        for target, frag in re.findall(r"\]\(([A-Za-z0-9_./]*\.md)?#([^)\s]+)\)", d.read_text()):
            dest = (d.parent / target).resolve() if target else d
            if frag not in headings.get(dest, set()):
                broken.append((d.name, target, frag))
    assert not broken, broken

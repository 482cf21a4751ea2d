"""A pre-finetuning corpus of (title, passage) pairs from what a Debian-style machine has
installed: no network, real prose written by people.

* Manual pages (/usr/share/man/man1..man8, English only): the NAME line is the title
  ("ls - list directory contents"), the first paragraphs of DESCRIPTION the passage.
* Installed Debian packages (/var/lib/dpkg/status): the short description (with the package's
  name) is the title, the long description the passage.

Pre-finetuning wants many noisy (title, passage) pairs; these are the same kind of pair as a web
page's title and body, at the scale one machine offers (tens of thousands). Write them as JSONL,
then prepare them like any corpus:

    python -m gemb.data.system_corpus --output data/system_pairs.jsonl
    gemb data prepare --name gemb_system_pretrain --format jsonl \\
        --split train=data/system_pairs.jsonl --query_field title --positive_field passage \\
        --tokenizer ~/.cache/gemb/models/gemma3-270m --output data/prepared/system_pretrain \\
        --num_shards 16

The troff is read with a small, forgiving reader (fonts, escapes and macros dropped; tables and
option lists kept as text): good enough for training text, not a renderer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

log = logging.getLogger(__name__)

MAN_ROOT = Path("/usr/share/man")
DPKG_STATUS = Path("/var/lib/dpkg/status")
MAX_PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 40

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SIZE = re.compile(r"\\s[+-]?\d+")
_NAMED = {r"\-": "-", r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(dq": '"', r"\(bu": "•",
          r"\(lq": '"', r"\(rq": '"', r"\(oq": "'", r"\(cq": "'", r"\e": "\\", r"\ ": " ",
          r"\&": "", r"\|": "", r"\^": "", r"\:": "", r"\/": "", r"\,": "", r"\%": "",
          r"\(co": "©", r"\(rg": "®", r"\(mu": "×", r"\~": " ", r"\0": " "}
_OTHER_ESCAPE = re.compile(r"\\(\*\(..|\*\[[^\]]*\]|\*.|\(..|\[[^\]]*\]|[a-zA-Z]\'[^']*\'|.)")
_TEXT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "TP", "IP", "Nm", "Nd",
                "Ar", "Fl", "Pa", "Xr", "Sy", "Em", "Dq", "Qq", "Ql", "Li", "Cm", "Ev", "Va"}
_BREAK_MACROS = {"PP", "P", "LP", "IP", "TP", "Pp", "sp", "br", "HP"}


def troff_text(line: str) -> str:
    """One troff line as plain text (macro name dropped for text macros, escapes resolved)."""
    if line.startswith((".", "'")):
        parts = line[1:].split(None, 1)
        if not parts or parts[0] not in _TEXT_MACROS or len(parts) == 1:
            return ""
        macro, line = parts
        if macro in ("BR", "RB", "BI", "IB", "IR", "RI"):  # alternating fonts, no spaces
            line = "".join(piece.strip('"') for piece in re.findall(r'"[^"]*"|\S+', line))
        else:
            line = line.replace('"', "")
    for escape, text in _NAMED.items():
        line = line.replace(escape, text)
    line = _FONT.sub("", line)
    line = _SIZE.sub("", line)
    line = _OTHER_ESCAPE.sub("", line)
    return " ".join(line.split())


def _sections(lines: Sequence[str]) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: Optional[str] = None
    for line in lines:
        if line.startswith((".SH", ".Sh")):
            current = line[3:].strip().strip('"').upper()
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)
    return sections


def man_page_pair(text: str) -> Optional[tuple[str, str]]:
    """(title, passage) of one man page's troff, or None when it has no NAME / DESCRIPTION."""
    lines = [line for line in text.splitlines() if not line.startswith(('.\\"', "'\\\"", '.\\}'))]
    if any(line.startswith(".so ") for line in lines[:3]):
        return None  # a link to another page
    sections = _sections(lines)
    name = " ".join(troff_text(line) for line in sections.get("NAME", []))
    name = " ".join(name.split())
    description = sections.get("DESCRIPTION")
    if not name or not description:
        return None
    paragraphs, current = [], []
    for line in description:
        macro = line[1:].split(None, 1)[0] if line.startswith((".", "'")) and len(line) > 1 else ""
        if macro in _BREAK_MACROS and current:
            paragraphs.append(" ".join(current))
            current = []
        text = troff_text(line)
        if text:
            current.append(text)
    if current:
        paragraphs.append(" ".join(current))
    passage = ""
    for paragraph in paragraphs:
        if passage and len(passage) + len(paragraph) > MAX_PASSAGE_CHARS:
            break
        passage = f"{passage}\n{paragraph}" if passage else paragraph
    passage = passage[:MAX_PASSAGE_CHARS].strip()
    if len(passage) < MIN_PASSAGE_CHARS:
        return None
    return name, passage


def man_page_records(root: Path = MAN_ROOT) -> Iterator[dict]:
    for section in sorted(root.glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                pair = man_page_pair(raw.decode("utf-8", "replace"))
            except (OSError, EOFError) as error:
                log.warning("skipping %s: %s", path, error)
                continue
            if pair:
                yield {"title": pair[0], "passage": pair[1],
                       "source": f"man:{section.name}/{path.name}"}


def debian_package_records(status: Path = DPKG_STATUS) -> Iterator[dict]:
    if not status.is_file():
        return
    for paragraph in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        description = fields.get("Description", "")
        short, _, long = description.partition("\n")
        # Long descriptions: " ." lines are paragraph breaks, the rest is wrapped text.
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\.\s*(?:\n|$)", long)]
        passage = "\n".join(p for p in paragraphs if p)
        if short and len(passage) >= MIN_PASSAGE_CHARS:
            yield {"title": f"{fields.get('Package', '')}: {short}",
                   "passage": passage[:MAX_PASSAGE_CHARS], "source": f"dpkg:{fields.get('Package')}"}


def write_corpus(output: Path) -> dict[str, int]:
    """Writes the JSONL corpus; returns {source kind: pairs written}."""
    output.parent.mkdir(parents=True, exist_ok=True)
    counts = {"man": 0, "dpkg": 0}
    with open(output, "w", encoding="utf-8") as handle:
        for records, kind in ((man_page_records(), "man"), (debian_package_records(), "dpkg")):
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[kind] += 1
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)
    counts = write_corpus(args.output)
    print(f"{sum(counts.values())} (title, passage) pairs -> {args.output} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""report.md as one self-contained HTML page: its figures embedded as base64 PNG, so the page
shows them wherever it is opened (MLflow's artifact viewer, a browser, a mail).

Converts exactly the markdown the report writes: headings, paragraphs, ``-`` lists, ``>``
quotes, pipe tables, images, links and ``<URL>`` links, bold, emphasis and code spans.

Nothing in the page points at another file: MLflow's artifact viewer shows it from a blob
address in a sandbox, where no relative link resolves. A link to a PNG file is that image,
embedded; a link to any other file (a table's CSV) is its name as text, with the path it
has beside the page; only absolute ``http(s)://`` links stay links.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")
_AUTOLINK = re.compile(r"&lt;(https?://.+?)&gt;")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")
STYLE = (
    "body{font-family:sans-serif;max-width:75em;margin:1em auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}"
    "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}td img.linked{max-width:24em}"
    "blockquote{border-left:4px solid #ccc;margin:0.5em 0;padding:0 1em;color:#333}"
    "code{background:#f3f3f3;padding:0 2px}"
)


def _image(match: re.Match, base: Path) -> str:
    alt, target = match.group(1), match.group(2)
    path = base / target
    if not path.is_file():
        return html.escape(f"[{alt}: {target} is missing]")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _inline(text: str, base: Path) -> str:
    """Inline markdown of one line, escaped; images embedded from files under ``base``."""
    out, pos = [], 0
    for match in _IMAGE.finditer(text):
        out += [_spans(text[pos : match.start()], base), _image(match, base)]
        pos = match.end()
    return "".join([*out, _spans(text[pos:], base)])


def _link(match: re.Match, base: Path) -> str:
    """An absolute link as a link; a PNG file embedded; another file's name as text."""
    label, target = match.group(1), html.unescape(match.group(2))
    if target.startswith(("http://", "https://")):
        return f'<a href="{html.escape(target)}">{label}</a>'
    path = base / target
    if target.lower().endswith(".png") and path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img class="linked" alt="{label}" src="data:image/png;base64,{data}">'
    if label == html.escape(target, quote=False):
        return f"<code>{label}</code>"
    return f"{label} (<code>{html.escape(target, quote=False)}</code>)"


def _spans(text: str, base: Path) -> str:
    text = html.escape(text, quote=False).replace("\\|", "|")
    text = _AUTOLINK.sub(r'<a href="\1">\1</a>', text)
    text = _CODE.sub(r"<code>\1</code>", text)
    text = _LINK.sub(lambda m: _link(m, base), text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    return _EMPH.sub(r"<em>\1</em>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def markdown_to_html(text: str, base: Path, title: str = "i-LN reproduction report") -> str:
    """The report's markdown ``text`` as an HTML page; images are read relative to ``base``."""
    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := re.match(r"^(#{1,6}) (.*)$", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2), base)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(_cells(lines[i]))
                i += 1
            head = "".join(f"<th>{_inline(c, base)}</th>" for c in block[0])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in row) + "</tr>"
                for row in block[2:]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif line.startswith(">"):
            block = []
            while i < len(lines) and lines[i].startswith(">"):
                block.append(lines[i].lstrip(">").strip())
                i += 1
            paragraphs = "\n".join(block).split("\n\n")
            quoted = "".join(f"<p>{_inline(' '.join(p.split()), base)}</p>" for p in paragraphs)
            body.append(f"<blockquote>{quoted}</blockquote>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:], base)}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
        else:
            block = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||>|- )", lines[i]):
                block.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(block), base)}</p>")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )

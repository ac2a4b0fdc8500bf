"""An offline, reproducible multilingual corpus from Debian's gettext translation catalogs.

Why: hubs are unreachable for the demo, the tests and many users' CI, yet the demo needs
real natural-language text in several scripts. Debian packages ship gettext catalogs
(`usr/share/locale/<locale>/LC_MESSAGES/*.mo`): each maps an English UI or help string
(the msgid) to its translation, so the catalogs of several packages are a small *parallel*
English->N-language corpus that installs by package name and version.

Source and licence: the strings belong to the named Debian packages (GNU coreutils, git,
tar, glibc, GTK, GLib, GNOME, ...), mostly under GPL or LGPL; each package's exact version,
the sha256 of its .deb, its licence (the `Files: *` stanza of its machine-readable
`debian/copyright`, else the licence read from that file by hand) and a copy of the
copyright file are written next to the corpus. Respect those licences when you redistribute.

The .deb is read in Python (an `ar` archive holding tarballs) and only the catalogs and the
copyright file are read from it: nothing from a package is installed or executed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import tarfile
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from layermoe_core.errors import LayerMoEError

# Debian bookworm packages with many translations. The first block is the command-line and
# system tools; the GTK/GNOME block is there because it is what translates into Bengali,
# Hindi and Nepali. Order matters: a string several packages share is taken from the first.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "coreutils",
    "git",
    "tar",
    "dpkg",
    "apt",
    "libc-l10n",
    "gnupg-l10n",
    "systemd",
    "packagekit",
    "postgresql-client-15",
    "xkb-data",
    "libglib2.0-data",
    "libgtk2.0-common",
    "libgtk-3-common",
    "gnome-control-center-data",
    "nautilus-data",
    "gedit-common",
    "gnome-terminal-data",
    "evolution-data-server-common",
    "gnome-software-common",
    "gnome-settings-daemon-common",
    "gnome-shell-common",
    "evince-common",
)

# Licences read by hand from the copyright files of default packages whose copyright file
# is not machine-readable (DEP-5).
KNOWN_LICENSES = {
    "libc-l10n": "LGPL-2.1+",
    "libgtk2.0-common": "LGPL-2+",
    "xkb-data": "MIT",
    "evince-common": "GPL-2+",
    "evolution-data-server-common": "LGPL-2+",
    "gedit-common": "GPL-2+",
    "gnome-settings-daemon-common": "GPL-2+",
    "gnome-shell-common": "GPL-2+",
    "nautilus-data": "GPL-3+",
}

ENGLISH = "en"  # the msgid side of every catalog
LOCALE_DIRS = {"zh": "zh_CN", "pt": "pt_BR"}  # language code -> locale directory, where they differ
MIN_WORDS = 3  # English words with a letter; shorter UI labels ("Open", "Cancel") are not prose

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?(@[a-z]+)?$")
_CATALOG_PATH = re.compile(r"^(?:\./)?usr/share/locale/([^/]+)/LC_MESSAGES/([^/]+)\.mo$")
_MO_MAGIC = 0x950412DE
# Placeholders: printf (%s, %1$s, %-10lu, %'d), Python/GLib braces ({name}, {0}), shell ($VAR, ${VAR}).
_PLACEHOLDER = re.compile(
    r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspn%]"
    r"|\{\w*\}|\$\{?\w+\}?"
)
# Accelerator markers: CJK-style "打开(_O)" / "(&O)", and GTK "_File" / Qt "&File". An English
# msgid has one when its only "_" or "&" starts a word: mid-word ones are identifiers (GIT_DIR,
# search_path) far more often than mnemonics. Its translation then loses its one marker wherever
# it sits ("Ά_νοιγμα").
_CJK_ACCELERATOR = re.compile(r"\s*\([_&][^\W_]\)")
_ACCELERATOR_AT_WORD_START = {marker: re.compile(rf"(?<!\w){marker}(?=[^\W_])(?!#?\w+;)") for marker in "_&"}


@dataclass(frozen=True)
class DebPackage:
    """One downloaded .deb and the control fields that identify it."""

    name: str
    version: str
    architecture: str
    path: Path
    sha256: str


def build_gettext_corpus(
    output_dir: str | Path,
    languages: Sequence[str],
    packages: Sequence[str] = DEFAULT_PACKAGES,
    download_dir: str | Path | None = None,
) -> Path:
    """Write `<lang>.jsonl` per language and `manifest.json` into output_dir; return output_dir.

    A record is {"id", "text", "source"}: the id hashes the English msgid, so records with the
    same id in two languages are translations of each other, and "source" names the package.
    `packages` are Debian package names, optionally pinned as "name=version". They are fetched
    with `apt-get download` into download_dir (default: output_dir/debs) unless a matching .deb
    is already there, so a rerun is offline. The same .debs give byte-identical output.
    """
    languages = _validate_languages(languages)
    output_dir = Path(output_dir)
    download_dir = Path(download_dir) if download_dir is not None else output_dir / "debs"
    debs = fetch_debs(packages, download_dir)
    translations, copyrights = _collect_translations(debs, languages)
    for lang in languages:
        if not translations[lang]:
            raise LayerMoEError(
                f"Language {lang!r} (locale directory {_locale_dir(lang)!r}) has no usable catalog in the packages "
                f"{[d.name for d in debs]}. Fix: add a Debian package that ships translations for it "
                f"(`dpkg -S /usr/share/locale/{_locale_dir(lang)}/LC_MESSAGES/` on a Debian machine names some), "
                "or choose another language."
            )

    output_dir.mkdir(parents=True, exist_ok=True)
    language_stats = {}
    for lang in languages:
        language_stats[lang] = _write_jsonl(output_dir / f"{lang}.jsonl", translations[lang])
        language_stats[lang]["locale_dir"] = None if lang == ENGLISH else _locale_dir(lang)
    manifest = {
        "source": "Debian gettext message catalogs (.mo): English msgids and their translations",
        "record": {
            "id": "sha256 of the English msgid, 16 hex digits; equal ids are translations",
            "text": "the string",
            "source": "the Debian package it came from",
        },
        "cleaning": {
            "min_english_words": MIN_WORDS,
            "dropped": "header, untranslated and format-only entries, entries whose English has fewer words",
            "accelerators": "GTK '_', Qt '&' and CJK '(_X)' markers stripped; printf-style placeholders kept",
            "plurals": "the singular msgid with the first plural form",
            "context": "msgctxt dropped; the first package, then catalog, in order wins for a repeated msgid",
        },
        "packages": [_package_entry(deb, copyrights[deb.name], output_dir) for deb in debs],
        "languages": language_stats,
    }
    manifest_text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    (output_dir / "manifest.json").write_text(manifest_text, encoding="utf-8")
    return output_dir


def _collect_translations(
    debs: list[DebPackage], languages: list[str]
) -> tuple[dict[str, dict[str, tuple[str, str]]], dict[str, str | None]]:
    """{language: {English msgid: (package, text)}} and {package: copyright text}.

    The first package, then catalog, to translate a msgid wins. English holds every msgid
    that one of the other languages translates.
    """
    wanted_dirs = {_locale_dir(lang): lang for lang in languages if lang != ENGLISH}
    translations: dict[str, dict[str, tuple[str, str]]] = {lang: {} for lang in languages}
    copyrights: dict[str, str | None] = {}
    for deb in debs:
        catalogs, copyrights[deb.name] = _read_deb(deb, set(wanted_dirs))
        for (locale_dir, domain), mo_bytes in sorted(catalogs.items()):
            lang = wanted_dirs[locale_dir]
            for msgid, text in parallel_entries(parse_mo(mo_bytes, f"{deb.path.name}:{locale_dir}/{domain}.mo")):
                translations[lang].setdefault(msgid, (deb.name, text))
                if ENGLISH in translations:
                    translations[ENGLISH].setdefault(msgid, (deb.name, msgid))
    return translations, copyrights


def fetch_debs(packages: Sequence[str], download_dir: Path) -> list[DebPackage]:
    """The .deb of every package spec ("name" or "name=version"), downloading only the missing ones."""
    if not packages:
        raise LayerMoEError("packages is empty. Fix: name at least one Debian package, e.g. DEFAULT_PACKAGES.")
    download_dir.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec in packages if _cached_deb(spec, download_dir) is None]
    if missing:
        _apt_download(missing, download_dir)
    debs = []
    for spec in packages:
        path = _cached_deb(spec, download_dir)
        if path is None:
            raise LayerMoEError(
                f"apt-get download did not produce a .deb for {spec!r} in {download_dir}. "
                "Fix: check the package name and version with `apt-cache policy`."
            )
        debs.append(_deb_package(path))
    return debs


def parse_mo(data: bytes, name: str = "catalog") -> Iterator[tuple[str, str]]:
    """(msgid, msgstr) pairs of a GNU .mo catalog, header included, decoded with its charset.

    Plural entries keep their NUL-separated forms and context entries their "ctxt\\x04" prefix.
    Parsed directly, not with `gettext`, so nothing of the catalog (Plural-Forms) is evaluated.
    """
    if len(data) < 20:
        raise LayerMoEError(f"{name} is not a .mo catalog ({len(data)} bytes). Fix: pass gettext .mo files.")
    for endian in ("<", ">"):
        magic, _revision, count, ids_at, strs_at = struct.unpack(f"{endian}5I", data[:20])
        if magic == _MO_MAGIC:
            break
    else:
        raise LayerMoEError(f"{name} has no .mo magic number. Fix: pass gettext .mo files (msgfmt output).")
    raw = []
    for i in range(count):
        id_len, id_off = struct.unpack_from(f"{endian}2I", data, ids_at + 8 * i)
        str_len, str_off = struct.unpack_from(f"{endian}2I", data, strs_at + 8 * i)
        raw.append((data[id_off : id_off + id_len], data[str_off : str_off + str_len]))
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            found = re.search(rb"charset=([\w.-]+)", msgstr)
            charset = found.group(1).decode("ascii") if found and found.group(1) != b"CHARSET" else "utf-8"
    for msgid, msgstr in raw:
        try:
            yield msgid.decode(charset), msgstr.decode(charset)
        except UnicodeDecodeError:
            continue


def parallel_entries(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Cleaned (English, translation) pairs that read as natural language; see the module's cleaning rules."""
    for msgid, msgstr in pairs:
        if not msgid or not msgstr:
            continue  # the header, or an untranslated entry
        english = msgid.split("\x04")[-1].split("\x00")[0]
        marker = accelerator_marker(english)
        english, text = clean_text(english, marker), clean_text(msgstr.split("\x00")[0], marker)
        if english and text and text != english and len(_words(english)) >= MIN_WORDS:
            yield english, text


def accelerator_marker(msgid: str) -> str | None:
    """The accelerator marker ("_" or "&") an English msgid carries, or None."""
    for marker, at_word_start in _ACCELERATOR_AT_WORD_START.items():
        if msgid.count(marker) == 1 and at_word_start.search(msgid):
            return marker
    return None


def clean_text(text: str, accelerator: str | None = None) -> str | None:
    """NFC text without accelerator markers and outer whitespace; None when it is format only."""
    text = _CJK_ACCELERATOR.sub("", unicodedata.normalize("NFC", text))
    if accelerator and text.count(accelerator) == 1:
        text = re.sub(rf"{accelerator}(?=[^\W_])", "", text)
    text = text.strip()
    return text if any(ch.isalpha() for ch in _PLACEHOLDER.sub("", text)) else None


def _words(text: str) -> list[str]:
    return [w for w in _PLACEHOLDER.sub(" ", text).split() if any(ch.isalpha() for ch in w)]


def _validate_languages(languages: Sequence[str]) -> list[str]:
    languages = list(languages)
    for lang in languages:
        if not isinstance(lang, str) or not _LANGUAGE_CODE.match(lang):
            raise LayerMoEError(f"Language code {lang!r} is not a gettext locale code. Fix: use codes such as 'el', 'zh' or 'pt_BR'.")
    if len(set(languages)) != len(languages) or not [lang for lang in languages if lang != ENGLISH]:
        raise LayerMoEError(
            f"languages={languages!r} must be distinct and name at least one language besides English "
            "(English is the msgid side of the other languages' catalogs). Fix: e.g. ['en', 'es', 'zh']."
        )
    return languages


def _locale_dir(lang: str) -> str:
    return LOCALE_DIRS.get(lang, lang)


def _cached_deb(spec: str, download_dir: Path) -> Path | None:
    """The one .deb for spec in download_dir; None if there is none. Filenames escape ':' as %3a."""
    name, _, version = spec.partition("=")
    candidates = [p for p in sorted(download_dir.glob(f"{name}_*.deb")) if not version or unquote(p.name.split("_")[1]) == version]
    if len(candidates) > 1:
        raise LayerMoEError(
            f"Several .debs for {spec!r} in {download_dir}: {[p.name for p in candidates]}. "
            "Fix: keep one, or pin the version as 'name=version', so the corpus is reproducible."
        )
    return candidates[0] if candidates else None


def _apt_download(specs: list[str], download_dir: Path) -> None:
    fix = (
        f"Fix: run on a Debian/Ubuntu machine with network access to its package archive, "
        f"or put the .debs (`apt-get download {' '.join(specs)}`) in download_dir ({download_dir}, "
        "--download-dir on the command line), or bring your own corpora (jsonl with a 'text' field)."
    )
    if shutil.which("apt-get") is None:
        raise LayerMoEError(f"apt-get is not available and these packages have no .deb in {download_dir}: {specs}. {fix}")
    result = subprocess.run(["apt-get", "download", *specs], cwd=download_dir, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if line.startswith("E:")) or result.stderr[-2000:]
        raise LayerMoEError(f"`apt-get download {' '.join(specs)}` failed:\n{errors}\n{fix}")


def _ar_members(path: Path) -> dict[str, bytes]:
    """Members of an `ar` archive (a .deb is one): debian-binary, control.tar.*, data.tar.*."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise LayerMoEError(f"{path} is not a .deb (no ar header). Fix: remove it and download the package again.")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58].decode("ascii"))
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    return members


def _open_tar(members: dict[str, bytes], stem: str, path: Path) -> tarfile.TarFile:
    for name, blob in members.items():
        if name.startswith(stem):
            if name.endswith(".zst"):
                raise LayerMoEError(
                    f"{path} holds a zstd-compressed {name}, which Python's tarfile cannot read. Fix: use Debian's (xz) packages."
                )
            # Stream mode: one sequential decompression pass (seeking back in an xz stream restarts it).
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r|*")
    raise LayerMoEError(f"{path} has no {stem}.* member. Fix: remove it and download the package again.")


def _deb_package(path: Path) -> DebPackage:
    with _open_tar(_ar_members(path), "control.tar", path) as tar:
        control = next(tar.extractfile(m).read().decode("utf-8") for m in tar if m.name.lstrip("./") == "control")
    fields = dict(re.findall(r"^(Package|Version|Architecture): (.+)$", control, flags=re.MULTILINE))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return DebPackage(fields["Package"], fields["Version"], fields["Architecture"], path, sha256)


def _read_deb(deb: DebPackage, locale_dirs: set[str]) -> tuple[dict[tuple[str, str], bytes], str | None]:
    """The package's .mo catalogs for locale_dirs, keyed (locale dir, domain), and its copyright text."""
    catalogs, copyright_text = {}, None
    with _open_tar(_ar_members(deb.path), "data.tar", deb.path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _CATALOG_PATH.match(member.name)
            if match and match.group(1) in locale_dirs:
                catalogs[(match.group(1), match.group(2))] = tar.extractfile(member).read()
            elif member.name.lstrip("./") == f"usr/share/doc/{deb.name}/copyright":
                copyright_text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return catalogs, copyright_text


def _license(name: str, copyright_text: str | None) -> str | None:
    """The `Files: *` licence of a DEP-5 copyright file, else the licence read by hand."""
    if copyright_text:
        match = re.search(r"^Files:\s*\*\s*\n(?:[^\n]+\n)*?License:\s*(.+)$", copyright_text, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return KNOWN_LICENSES.get(name)


def _package_entry(deb: DebPackage, copyright_text: str | None, output_dir: Path) -> dict:
    copyright_file = None
    if copyright_text is not None:
        copyright_file = f"copyright/{deb.name}"
        (output_dir / "copyright").mkdir(exist_ok=True)
        (output_dir / copyright_file).write_text(copyright_text, encoding="utf-8")
    return {
        "name": deb.name,
        "version": deb.version,
        "architecture": deb.architecture,
        "deb": deb.path.name,
        "sha256": deb.sha256,
        "license": _license(deb.name, copyright_text),
        "copyright_file": copyright_file,
    }


def _write_jsonl(path: Path, entries: dict[str, tuple[str, str]]) -> dict:
    """Write records sorted by id (a hash, so the order mixes packages); return the counts."""
    records = sorted((_record_id(msgid), text, package) for msgid, (package, text) in entries.items())
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc_id, text, package in records:
            f.write(json.dumps({"id": doc_id, "text": text, "source": package}, ensure_ascii=False) + "\n")
    return {"file": path.name, "documents": len(records), "characters": sum(len(text) for _, text, _ in records)}


def _record_id(msgid: str) -> str:
    return hashlib.sha256(msgid.encode("utf-8")).hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline multilingual demo corpus from Debian gettext catalogs.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--languages", nargs="+", required=True, help="e.g. en es zh el hu tr bn hi ne")
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), help="Debian package names, optionally name=version")
    parser.add_argument("--download-dir", type=Path, default=None, help="where the .debs are cached (default: OUTPUT_DIR/debs)")
    args = parser.parse_args(argv)
    out = build_gettext_corpus(args.output_dir, args.languages, args.packages, args.download_dir)
    for lang, stats in json.loads((out / "manifest.json").read_text(encoding="utf-8"))["languages"].items():
        print(f"{lang}: {stats['documents']} documents, {stats['characters']} characters")


if __name__ == "__main__":
    main()

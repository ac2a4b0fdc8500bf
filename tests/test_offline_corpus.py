"""The gettext corpus, built offline from tiny .debs generated here (real .mo and ar/tar formats)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from demo import offline_corpus
from demo.offline_corpus import build_gettext_corpus, parse_mo
from layermoe_core import LayerMoEError

HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
COPYRIGHT = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nCopyright: someone\nLicense: GPL-3+\n"


def mo_bytes(entries: dict[str, str]) -> bytes:
    """A little-endian GNU .mo catalog (what msgfmt writes), header entry included."""
    pairs = sorted({"": HEADER, **entries}.items())
    ids, strs = [k.encode() for k, _ in pairs], [v.encode() for _, v in pairs]
    ids_at, strs_at = 28, 28 + 8 * len(pairs)
    data_at = strs_at + 8 * len(pairs)
    table_ids, table_strs, blob = b"", b"", b""
    for table, values in (("ids", ids), ("strs", strs)):
        for value in values:
            entry = struct.pack("<2I", len(value), data_at + len(blob))
            blob += value + b"\0"
            if table == "ids":
                table_ids += entry
            else:
                table_strs += entry
    return struct.pack("<7I", 0x950412DE, 0, len(pairs), ids_at, strs_at, 0, data_at) + table_ids + table_strs + blob


def tar_xz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def write_deb(
    directory: Path, name: str, version: str, catalogs: dict[str, dict[str, str]], copyright_text: str | None = COPYRIGHT
) -> Path:
    """A .deb (ar archive) whose data holds usr/share/locale/<locale>/LC_MESSAGES/<name>.mo."""
    control = f"Package: {name}\nVersion: {version}\nArchitecture: all\nDescription: test\n".encode()
    data = {f"usr/share/locale/{locale}/LC_MESSAGES/{name}.mo": mo_bytes(entries) for locale, entries in catalogs.items()}
    if copyright_text is not None:
        data[f"usr/share/doc/{name}/copyright"] = copyright_text.encode()
    archive = b"!<arch>\n"
    for member, content in (("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": control})), ("data.tar.xz", tar_xz(data))):
        archive += f"{member:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode() + content + b"\n" * (len(content) % 2)
    path = directory / f"{name}_{version.replace(':', '%3a')}_all.deb"
    path.write_bytes(archive)
    return path


@pytest.fixture
def debs(tmp_path, monkeypatch):
    """Two packages in a download dir; apt-get is made unavailable, so every build here is offline."""
    monkeypatch.setattr(shutil, "which", lambda _: None)
    directory = tmp_path / "debs"
    directory.mkdir()
    write_deb(
        directory,
        "greeter",
        "1:2.0-1",
        {
            "el": {
                "Print a friendly greeting": "Τύπωσε έναν φιλικό χαιρετισμό",
                "_Open the greeting file": "Ά_νοιγμα του αρχείου χαιρετισμού",
                "Could not open %s for reading": "Αδυναμία ανοίγματος του %s για ανάγνωση",
                "%s: %s": "%s: %s",
                "Quit": "Έξοδος",
                "Same text in every language": "Same text in every language",
                "menu\x04Show all the windows": "Εμφάνιση όλων των παραθύρων",
                "Deleted one old file\x00Deleted %d old files": "Διαγράφηκε ένα παλιό αρχείο\x00Διαγράφηκαν %d παλιά αρχεία",
                "Untranslated entry stays out": "",
            },
            "zh_CN": {
                "Print a friendly greeting": "打印友好的问候",
                "_Open the greeting file": "打开问候文件(_O)",
            },
        },
    )
    write_deb(
        directory,
        "other",
        "0.5",
        {
            "el": {
                "Print a friendly greeting": "Άλλη μετάφραση του χαιρετισμού",
                "Search the whole disk now": "Αναζήτηση σε όλο τον δίσκο τώρα",
            }
        },
        copyright_text="Not machine readable.\n",
    )
    return directory


def build(tmp_path, debs, languages=("en", "el", "zh"), out="corpus"):
    return build_gettext_corpus(tmp_path / out, languages, packages=["greeter", "other"], download_dir=debs)


def read_jsonl(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_records_with_equal_ids_are_translations_of_each_other(tmp_path, debs):
    out = build(tmp_path, debs)
    en, el, zh = (read_jsonl(out / f"{lang}.jsonl") for lang in ("en", "el", "zh"))
    greeting = next(i for i, r in en.items() if r["text"] == "Print a friendly greeting")
    assert el[greeting]["text"] == "Τύπωσε έναν φιλικό χαιρετισμό"
    assert zh[greeting]["text"] == "打印友好的问候"  # zh reads the zh_CN catalogs
    assert set(el) <= set(en) and set(zh) <= set(en)


def test_cleaning_keeps_prose_and_drops_labels_format_only_and_untranslated_entries(tmp_path, debs):
    out = build(tmp_path, debs)
    en_texts = {r["text"] for r in read_jsonl(out / "en.jsonl").values()}
    el_texts = {r["text"] for r in read_jsonl(out / "el.jsonl").values()}
    assert en_texts == {
        "Print a friendly greeting",
        "Open the greeting file",  # accelerator stripped
        "Could not open %s for reading",  # placeholder kept
        "Show all the windows",  # context dropped
        "Deleted one old file",  # the singular of a plural entry
        "Search the whole disk now",
    }
    assert "Άνοιγμα του αρχείου χαιρετισμού" in el_texts  # a mid-word accelerator in the translation
    assert "Διαγράφηκε ένα παλιό αρχείο" in el_texts  # the first plural form
    assert "打开问候文件" in {r["text"] for r in read_jsonl(out / "zh.jsonl").values()}  # CJK "(_O)" stripped


def test_a_string_two_packages_translate_comes_from_the_first(tmp_path, debs):
    records = read_jsonl(build(tmp_path, debs) / "el.jsonl").values()
    greetings = [r for r in records if "χαιρετισμ" in r["text"] and "αρχείου" not in r["text"]]
    assert [(r["text"], r["source"]) for r in greetings] == [("Τύπωσε έναν φιλικό χαιρετισμό", "greeter")]


def test_manifest_records_package_versions_licences_and_counts(tmp_path, debs):
    out = build(tmp_path, debs)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    packages = {p["name"]: p for p in manifest["packages"]}
    assert packages["greeter"]["version"] == "1:2.0-1"
    assert packages["greeter"]["deb"] == "greeter_1%3a2.0-1_all.deb"
    assert packages["greeter"]["license"] == "GPL-3+"  # from the DEP-5 "Files: *" stanza
    assert packages["other"]["license"] is None  # not machine readable and not a known package
    assert (out / packages["other"]["copyright_file"]).read_text(encoding="utf-8") == "Not machine readable.\n"
    for lang in ("en", "el", "zh"):
        texts = [r["text"] for r in read_jsonl(out / f"{lang}.jsonl").values()]
        stats = manifest["languages"][lang]
        assert (stats["documents"], stats["characters"]) == (len(texts), sum(map(len, texts)))
    assert manifest["languages"]["zh"]["locale_dir"] == "zh_CN"


def test_rebuild_from_the_same_debs_is_byte_identical(tmp_path, debs):
    first, second = build(tmp_path, debs, out="first"), build(tmp_path, debs, out="second")
    names = sorted(p.name for p in first.iterdir())
    assert names == ["copyright", "el.jsonl", "en.jsonl", "manifest.json", "zh.jsonl"]
    for name in names[1:]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_language_without_catalogs_is_an_error_naming_it(tmp_path, debs):
    with pytest.raises(LayerMoEError, match="'hu'.*no usable catalog"):
        build(tmp_path, debs, languages=("en", "el", "hu"))


def test_missing_deb_without_apt_get_is_an_error_naming_the_fix(tmp_path, debs):
    with pytest.raises(LayerMoEError, match=r"apt-get is not available.*\['absent'\].*download_dir"):
        build_gettext_corpus(tmp_path / "corpus", ["en", "el"], packages=["greeter", "absent"], download_dir=debs)


def test_two_cached_versions_of_a_package_must_be_disambiguated(tmp_path, debs):
    write_deb(debs, "other", "0.6", {"el": {}})
    with pytest.raises(LayerMoEError, match="Several .debs for 'other'"):
        build(tmp_path, debs)
    out = build_gettext_corpus(tmp_path / "pinned", ["en", "el"], packages=["greeter", "other=0.5"], download_dir=debs)
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["packages"][1]["version"] == "0.5"


def test_english_alone_is_rejected_because_it_is_the_msgid_side(tmp_path, debs):
    with pytest.raises(LayerMoEError, match="at least one language besides English"):
        build(tmp_path, debs, languages=("en",))


def test_parse_mo_reads_plural_forms_and_rejects_non_catalogs():
    pairs = dict(parse_mo(mo_bytes({"one file\x00%d files": "ένα αρχείο\x00%d αρχεία"})))
    assert pairs["one file\x00%d files"] == "ένα αρχείο\x00%d αρχεία"
    with pytest.raises(LayerMoEError, match="no .mo magic"):
        list(parse_mo(b"\0" * 32, "bad.mo"))


def test_cli_builds_the_corpus(tmp_path, debs, capsys):
    offline_corpus.main([str(tmp_path / "cli"), "--languages", "en", "el", "--packages", "greeter", "other", "--download-dir", str(debs)])
    assert "el: 6 documents" in capsys.readouterr().out

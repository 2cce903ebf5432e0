"""Which GLIBC / GLIBCXX versions a compiled ``.so`` needs, read from its ELF without loading it.

``import flash_attn`` dlopens ``flash_attn_2_cuda*.so``; when the node's C library is older
than the one the wheel was built against, the import fails (or worse). The symbol versions a
library needs sit in its ``.gnu.version_r`` section, and those a library provides in
``.gnu.version_d``, so both sides can be compared before anything is imported.
pyelftools reads them in pure Python: no ``objdump`` or ``readelf`` needed on the node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection

# The version families whose mismatch breaks a flash-attn import.
_VERSION = re.compile(r"^(GLIBC|GLIBCXX|CXXABI)_(\d+(?:\.\d+)*)$")


def version_key(version: str) -> tuple[int, ...]:
    """'2.32' -> (2, 32), so '2.4' < '2.32' compares as numbers do."""
    return tuple(int(p) for p in re.findall(r"\d+", version))


def highest(versions: Iterable[Optional[str]]) -> Optional[str]:
    present = [v for v in versions if v]
    return max(present, key=version_key) if present else None


def _by_family(names: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        m = _VERSION.match(name)
        if m:
            family, version = m.groups()
            out[family] = highest([out.get(family), version])
    return out


def _version_names(path: str | Path, section_type: type) -> list[str]:
    """Symbol-version names of one kind of version section (needed or defined)."""
    names = []
    try:
        with open(path, "rb") as f:
            for section in ELFFile(f).iter_sections():
                if isinstance(section, section_type):
                    for _, aux in section.iter_versions():
                        names += [a.name for a in aux]
    except ELFError as e:
        raise ValueError(f"{path}: not an ELF file ({e})") from None
    return names


def required_versions(path: str | Path) -> dict[str, str]:
    """The highest version the library needs per family, e.g. {'GLIBC': '2.32', 'GLIBCXX': '3.4.29'};
    ValueError for a file that is not ELF."""
    return _by_family(_version_names(path, GNUVerNeedSection))


def provided_versions(path: str | Path) -> dict[str, str]:
    """The highest version a library defines per family (libc.so.6 -> GLIBC, libstdc++ -> GLIBCXX)."""
    return _by_family(_version_names(path, GNUVerDefSection))

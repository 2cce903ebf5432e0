"""YAML for config files: read with a size limit, parsed by PyYAML's safe loader with a
duplicate key an error.

A plain ``yaml.safe_load`` keeps the last of two equal keys (``train: {lr: 0.001, lr: 0.5}``
trains at 0.5) without a word; a config that says one thing twice is a mistake to report. And a
plain read takes whatever the path gives: ``/dev/zero`` fills the memory, a FIFO waits forever,
a file of hundreds of MB parses for minutes.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import yaml

MAX_BYTES = 1 << 20  # a config is a few KB; the largest here, with every key, is far below this

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key_path: str, mark):
        self.key_path, self.problem_mark = key_path, mark
        self.problem = f"duplicate key '{key_path}'"
        super().__init__(self.problem)


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping holding one key twice, naming its full path."""

    def construct_document(self, node):
        _check_unique(node, "", set())
        return super().construct_document(node)


# YAML 1.1, which PyYAML follows, reads 3e-4 as a string (it wants 3.0e-4); configs, read
# strictly (trainer/config.py), mean the number, as YAML 1.2 does.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def _check_unique(node, path: str, seen: set[int]) -> None:
    # An alias is the same node object again: visit each once, so alias bombs stay cheap.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set = set()
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            child = f"{path}.{name}" if path else str(name)
            if key in keys:
                raise DuplicateKeyError(child, key_node.start_mark)
            keys.add(key)
            _check_unique(value_node, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique(item, f"{path}[{i}]", seen)


def load(text: str):
    """The document in ``text``; raises yaml.YAMLError (DuplicateKeyError for a repeated key)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


class NotAConfigFile(ValueError):
    """What a path names is no config file: the message says what it is."""


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket"}


def read_text(path: Path) -> str:
    """The text of a config file, a regular file of at most MAX_BYTES: NotAConfigFile for one
    that is not (checked before reading, so a device or a FIFO is never opened), OSError where it
    cannot be read, UnicodeDecodeError for binary content."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise NotAConfigFile(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')}); "
                             "expected a YAML file")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)  # at most: it may have grown since the stat
    if len(data) > MAX_BYTES:
        raise NotAConfigFile(f"larger than {MAX_BYTES // 2**20} MiB, the most a config file may hold")
    return data.decode("utf-8")

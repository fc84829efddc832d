"""Resumable indexing: the probe results of `mscl-stream index`, appended to a sidecar file as they arrive.

``<manifest stem>.progress.jsonl`` next to the manifest: a first line with the settings that decide a
probe result (source, format, CUDA, minimum length, MDS estimator), then one JSON line per probed entry,
written and flushed as soon as the entry is done. A run that stops (Ctrl-C, a kill, a crash) leaves it
behind; the next run with the same settings reads it, probes only the entries it lacks, and deletes it
once the manifest is written. A torn last line (killed mid-write) is ignored; a file written under other
settings is replaced, never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mscl_stream.data.discover import Entry
from mscl_stream.data.probe import Probe

VERSION = 1


def entry_key(e: Entry) -> str:
    """One probe per (file, frame range): the same file listed under two splits is probed once."""
    return f"{e.path}\t{e.start}\t{e.end}"


def progress_path(output: Path) -> Path:
    """The sidecar of manifest ``output`` (a ``{split}`` template shares one sidecar for all its splits)."""
    stem = output.stem.replace("{split}", "")
    return output.with_name(f"{stem}.progress.jsonl")


class ProbeLog:
    """The sidecar: ``done`` holds the results read back; :meth:`add` appends one and flushes it."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = path, {"version": VERSION, **settings}
        self.done: dict[str, Probe] = self._read()
        self._f = None

    def _read(self) -> dict[str, Probe]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            if not lines or json.loads(lines[0]) != self.settings:
                return {}                       # other settings (or not ours): start afresh
        except json.JSONDecodeError:
            return {}
        fields = {f.name for f in dataclasses.fields(Probe)}
        done = {}
        for line in lines[1:]:
            try:
                d = json.loads(line)
                done[d["key"]] = Probe(**{k: v for k, v in d["probe"].items() if k in fields})
            except (json.JSONDecodeError, KeyError, TypeError):
                continue                        # a line torn by a kill mid-write
        return done

    def __enter__(self) -> "ProbeLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # rewrite what was read (drops a torn tail) under this run's header, then append
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.settings) + "\n")
            for key, p in self.done.items():
                f.write(json.dumps({"key": key, "probe": dataclasses.asdict(p)}) + "\n")
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def add(self, key: str, probe: Probe) -> None:
        self.done[key] = probe
        assert self._f is not None
        self._f.write(json.dumps({"key": key, "probe": dataclasses.asdict(probe)}) + "\n")
        self._f.flush()

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def remove(self) -> None:
        """The manifest is written: the sidecar has served its purpose."""
        self.path.unlink(missing_ok=True)

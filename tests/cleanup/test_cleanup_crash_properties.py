"""Hypothesis state machine: passes crashing at any deletion step or in the middle of copying a file into
the archive, interleaved with registrations and files rewritten on the server. The real job, archiver and journal run against an in-memory fake of the
tracking server (the planner's fakes; the MLflow-facing behaviour is covered by the acceptance tests).

Invariants after every step: no archive ever shrinks, every archive verifies, every file that left the
server is in an archive byte for byte, and a registered run never loses a file after its registration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cleanup.archive import MANIFEST_NAME, Archiver, copy_and_sync, verify_archive
from cleanup.job import CleanupJob
from cleanup.journal import DeletionStep
from cleanup.model import ModelVersionRef
from cleanup.policy import RetentionPolicy
from tests.cleanup.fake_server import NOW, VICTIMS, Crash, FakeServer

POLICY = RetentionPolicy(top_n=1, retention_days=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CrashingPasses(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cleanup-sm-"))
        self.server = FakeServer()
        self.manifests: dict[Path, dict[str, str]] = {}
        self.ever: set[tuple[str, str]] = set()  # (run id, sha256) of every file a victim ever had
        self.protected: dict[str, set[tuple[str, str]]] = {}  # registered run → (uri, path) it had then
        self._remember_files()

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _owner_of(self, uri: str) -> str:
        if uri.startswith("fake:/runs/"):
            return uri.removeprefix("fake:/runs/")
        return uri.removeprefix("fake:/models/m-")

    def _remember_files(self) -> None:
        for uri, files in self.server.files.items():
            self.ever |= {(self._owner_of(uri), sha(data)) for data in files.values()}

    def _pass(self, crash_at: int | None, copy_crash_at: int | None = None) -> None:
        steps: list[DeletionStep] = []
        copies: list[Path] = []

        def hook(run_id: str, step: DeletionStep) -> None:
            if crash_at is not None and len(steps) == crash_at:
                raise Crash(step.key)
            steps.append(step)

        def copy(source: Path, destination: Path) -> None:
            if copy_crash_at is not None and len(copies) == copy_crash_at:
                destination.write_bytes(source.read_bytes()[:1])  # a torn write, then the crash
                raise Crash(str(destination))
            copies.append(destination)
            copy_and_sync(source, destination)

        archiver = Archiver(self.root, self.server, copy_file=copy)
        job = CleanupJob(self.server, POLICY, archiver=archiver, before_step=hook)
        with contextlib.suppress(Crash):
            job.run(NOW)

    @rule(crash_at=st.integers(min_value=0, max_value=8))
    def crashing_pass(self, crash_at: int) -> None:
        self._pass(crash_at)

    @rule(copy_crash_at=st.integers(min_value=0, max_value=6))
    def pass_crashing_while_archiving(self, copy_crash_at: int) -> None:
        self._pass(None, copy_crash_at)

    @rule()
    def full_pass(self) -> None:
        self._pass(None)

    @rule(run_id=st.sampled_from(VICTIMS))
    def register(self, run_id: str) -> None:
        if run_id in self.server.active and run_id not in self.protected:
            self.server.versions.append(ModelVersionRef(f"model-{run_id}", "1", f"runs:/{run_id}/x", run_id))
            self.protected[run_id] = self._files_of(run_id)

    def _files_of(self, run_id: str) -> set[tuple[str, str]]:
        uris = [f"fake:/runs/{run_id}", f"fake:/models/m-{run_id}"]
        return {(uri, path) for uri in uris for path in self.server.files.get(uri, {})}

    @rule(run_id=st.sampled_from(VICTIMS), content=st.binary(min_size=1, max_size=8))
    def rewrite_a_file(self, run_id: str, content: bytes) -> None:
        run = self.server.active.get(run_id)
        if run is not None and run.artifact_uri in self.server.files:
            # The user replaces the content: the old one leaving the server is not the job's doing.
            old = self.server.files[run.artifact_uri]["checkpoint.bin"]
            self.ever.discard((run_id, sha(old)))
            self.server.files[run.artifact_uri]["checkpoint.bin"] = content
            self._remember_files()

    @invariant()
    def archives_never_shrink_and_always_verify(self) -> None:
        if not hasattr(self, "root"):
            return
        for manifest_path in self.root.glob(f"*/*/{MANIFEST_NAME}"):
            verify_archive(manifest_path.parent)
            entries = {e["path"]: e["sha256"] for e in json.loads(manifest_path.read_text())["files"]}
            previous = self.manifests.get(manifest_path.parent, {})
            assert previous.items() <= entries.items(), f"{manifest_path} lost or changed entries"
            self.manifests[manifest_path.parent] = entries

    @invariant()
    def no_file_that_left_the_server_is_lost(self) -> None:
        if not hasattr(self, "root"):
            return
        on_server = {(self._owner_of(uri), sha(d)) for uri, files in self.server.files.items() for d in files.values()}
        archived = {
            (run_dir.name, digest) for run_dir, entries in self.manifests.items() for digest in entries.values()
        }
        assert self.ever - on_server <= archived

    @invariant()
    def registered_runs_keep_their_files(self) -> None:
        if not hasattr(self, "root"):
            return
        for run_id, files in self.protected.items():
            assert run_id in self.server.active, f"registered run {run_id} was deleted"
            # Files deleted before the registration are in the archive (checked above); none after it.
            assert files <= self._files_of(run_id), f"registered run {run_id} lost files"


CrashingPasses.TestCase.settings = settings(max_examples=100, stateful_step_count=12, deadline=None)
TestCrashingPasses = CrashingPasses.TestCase

"""Chapter 0: the settings parser (one set of rules for every key=value), from_settings, human_bytes."""
import configparser
from dataclasses import dataclass

import pytest

from course_lib.core import (Settings, SettingsError, from_settings, human_bytes, load_settings, parse_key_values,
                             parse_value)


def test_human_bytes_rounds_before_choosing_the_unit():
    "999_999 bytes is 1.0 MB, not '1000.0 kB' (the figure is rounded first, then its unit chosen)."
    cases = {0: "0 B", 999: "999 B", 999.5: "1.0 kB", 1000: "1.0 kB", 999_949: "999.9 kB", 999_999: "1.0 MB",
             1_500_000: "1.5 MB", 999_999_999: "1.0 GB", 3.2e12: "3.2 TB", 5e15: "5000.0 TB", -2500: "-2.5 kB"}
    assert {n: human_bytes(n) for n in cases} == cases


@pytest.mark.parametrize("raw", ["1", "yes", "true", "on", "True", " YES "])
def test_booleans_read_as_configparser_reads_them(raw):
    "configparser's own table is the reference: the file and the command line read booleans alike."
    assert parse_value(raw, bool, "compile", "here") is configparser.ConfigParser.BOOLEAN_STATES[raw.strip().lower()]
    assert parse_value(raw.replace("1", "0").replace("yes", "no").replace("true", "false").replace("on", "off")
                       .replace("True", "False").replace("YES", "NO"), bool, "compile", "here") is False


def test_parse_key_values_for_any_dataclass():
    @dataclass
    class Mine:
        steps: int = 1
        lr: float = 0.1
        fast: bool = False
    assert parse_key_values(["steps=32_000", "lr=3e-3", "fast=on"], Mine) == {"steps": 32_000, "lr": 3e-3, "fast": True}
    assert parse_key_values({"steps": "7"}, Mine) == {"steps": 7}
    with pytest.raises(SettingsError, match="did you mean 'steps'"):
        parse_key_values(["setps=3"], Mine)
    with pytest.raises(SettingsError, match="must be a bool"):
        parse_key_values(["fast=maybe"], Mine)
    with pytest.raises(SettingsError, match="must look like key=value"):
        parse_key_values(["steps"], Mine)
    assert load_settings("ci", ["steps=1_000"]).steps == 1000


def test_from_settings_matches_field_names_and_overrides_win():
    @dataclass
    class Config:
        seed: int = 0
        vocab_size: int = 1
        mine: str = "default"
    s = load_settings("ci", ["seed=5"])
    assert from_settings(Config, s) == Config(seed=5, vocab_size=s.vocab_size, mine="default")
    assert from_settings(Config, s, seed=9, mine="x") == Config(seed=9, vocab_size=s.vocab_size, mine="x")
    assert from_settings(Config, Settings()).vocab_size == Settings.vocab_size


def test_a_second_registration_of_a_name_is_refused():
    from course_lib.core import DEMOS, STAGES, demo, stage

    def first(): pass
    def second(): pass
    try:
        demo("test-dup")(first)
        demo("test-dup")(first)  # re-running the same cell registers the same function again: fine
        with pytest.raises(ValueError, match="already registered by .*first"):
            demo("test-dup")(second)
        stage("test-dup", order=999)(first)
        with pytest.raises(ValueError, match="already registered"):
            stage("test-dup", order=999)(second)
    finally:
        DEMOS.pop("test-dup", None)
        STAGES.pop("test-dup", None)


def test_a_lesson_may_redefine_what_its_module_registered():
    from course_lib.core import DEMOS, demo

    def lesson_demo(): pass
    def library_demo(): pass
    library_demo.__module__, library_demo.__qualname__ = "course_lib.somewhere", "lesson_demo"
    lesson_demo.__module__, lesson_demo.__qualname__ = "__main__", "lesson_demo"
    try:
        demo("test-lesson")(library_demo)
        demo("test-lesson")(lesson_demo)          # the notebook's own copy of the exported function
        assert DEMOS["test-lesson"] is lesson_demo
    finally:
        DEMOS.pop("test-lesson", None)

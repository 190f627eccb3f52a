"""Edits across all captions at once: find & replace, add the trigger, undo, tag and word counts (ui.caption_tools)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.errors import UserError
from ui import caption_tools, store


@pytest.fixture
def run(tmp_path):
    """A run folder with three captioned images and one image without a caption."""
    run_dir = tmp_path / "r1"
    data = store.dataset_dir(run_dir)
    data.mkdir(parents=True)
    captions = {"a.png": "a painting of a red circle, zkstyle", "b.png": "A Painting of a blue square",
                "c.png": "paintings of, a tree", "d.png": None}
    for name, text in captions.items():
        Image.new("RGB", (8, 8)).save(data / name)
        if text is not None:
            (data / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    (data / "notes.txt").write_text("not a caption\n")  # a .txt without an image is left alone
    return run_dir


def captions(run_dir) -> dict[str, str]:
    return {n: store.read_caption(run_dir, n) for n in ("a.png", "b.png", "c.png", "d.png")}


@pytest.mark.parametrize("find,replace,whole,case,expected,changed", [
    ("a painting of", "", True, False,
     {"a.png": "a red circle, zkstyle", "b.png": "a blue square", "c.png": "paintings of, a tree", "d.png": ""}, 2),
    ("a painting of", "", True, True,
     {"a.png": "a red circle, zkstyle", "b.png": "A Painting of a blue square", "c.png": "paintings of, a tree",
      "d.png": ""}, 1),
    ("painting", "drawing", True, False,  # whole words: "paintings" is another word
     {"a.png": "a drawing of a red circle, zkstyle", "b.png": "A drawing of a blue square",
      "c.png": "paintings of, a tree", "d.png": ""}, 2),
    ("painting", "drawing", False, False,
     {"a.png": "a drawing of a red circle, zkstyle", "b.png": "A drawing of a blue square",
      "c.png": "drawings of, a tree", "d.png": ""}, 3),
    ("paintings of", "", True, False,  # a deleted tag leaves no stray comma behind
     {"a.png": "a painting of a red circle, zkstyle", "b.png": "A Painting of a blue square", "c.png": "a tree",
      "d.png": ""}, 1),
    ("zkstyle", "zk\\1 style", True, False,  # the replacement is plain text, never a regex template
     {"a.png": "a painting of a red circle, zk\\1 style", "b.png": "A Painting of a blue square",
      "c.png": "paintings of, a tree", "d.png": ""}, 1),
])
def test_replace_in_all_captions(run, find, replace, whole, case, expected, changed):
    assert caption_tools.replace_in_captions(run, find, replace, whole, case) == (changed, 3)  # d has no caption
    assert captions(run) == expected
    assert (store.dataset_dir(run) / "notes.txt").read_text() == "not a caption\n"


def test_undo_puts_back_the_last_bulk_change_once(run):
    before = captions(run)
    caption_tools.replace_in_captions(run, "a painting of", "")
    caption_tools.add_trigger(run, "zkstyle")
    after_replace = {**before, "a.png": "a red circle, zkstyle", "b.png": "a blue square"}
    assert caption_tools.undo(run) == (2, 0)  # b and c had no trigger (d has no caption file: left alone)
    assert captions(run) == after_replace
    assert not (store.dataset_dir(run) / "d.txt").exists()
    with pytest.raises(UserError, match="nothing to undo"):
        caption_tools.undo(run)  # one level


def test_a_change_that_matches_nothing_keeps_the_undo_record(run):
    caption_tools.replace_in_captions(run, "a painting of", "")
    assert caption_tools.replace_in_captions(run, "watercolor", "ink") == (0, 3)
    assert (run / "dataset" / caption_tools.UNDO_FILE).is_file()
    assert caption_tools.undo(run) == (2, 0) and captions(run)["b.png"] == "A Painting of a blue square"


def test_add_trigger_only_where_it_is_missing(run):
    assert caption_tools.add_trigger(run, " zkstyle ") == (2, 3)
    assert captions(run) == {"a.png": "a painting of a red circle, zkstyle",
                             "b.png": "zkstyle, A Painting of a blue square",
                             "c.png": "zkstyle, paintings of, a tree", "d.png": ""}
    assert not (store.dataset_dir(run) / "d.txt").exists()  # training puts the trigger before its file name's words
    assert caption_tools.uncaptioned(run) == ["d.png"]
    assert caption_tools.add_trigger(run, "ZKSTYLE") == (0, 3)  # found whatever the case
    from trainer.trigger import with_trigger

    store.write_caption(run, "d.png", "ZKstyle, a tree")
    assert caption_tools.add_trigger(run, "zkstyle") == (0, 4)
    # training finds it where the tools do (no second trigger), spelled as typed: T5 tells the cases apart
    assert with_trigger(store.read_caption(run, "d.png"), "zkstyle") == "zkstyle, a tree"


def test_a_caption_file_that_is_not_utf8_is_left_alone(run):
    """Training reads the file name for such a picture; only a person can say what the file meant, so no bulk
    edit reads or overwrites it, and Undo never touches it."""
    data = store.dataset_dir(run)
    Image.new("RGB", (8, 8)).save(data / "cafe.png")
    latin1 = "café au lait, a painting of\n".encode("latin-1")
    (data / "cafe.txt").write_bytes(latin1)
    assert caption_tools.unreadable(run) == ["cafe.txt"]
    assert caption_tools.add_trigger(run, "zkstyle") == (2, 3)  # b and c; not the café, not d (no caption)
    assert caption_tools.replace_in_captions(run, "a painting of", "") == (2, 3)
    assert (data / "cafe.txt").read_bytes() == latin1
    assert caption_tools.undo(run) == (2, 0)
    assert (data / "cafe.txt").read_bytes() == latin1 and not (data / "d.txt").exists()
    assert caption_tools.tag_counts(run)[1] == 3  # the three captions there are: a, b, c


def test_undo_keeps_hand_edits_and_removed_images_and_a_damaged_record_is_one_line(run):
    caption_tools.replace_in_captions(run, "painting", "drawing", whole_words=False)
    store.remove_item(run, "b.png")
    store.write_caption(run, "c.png", "an oak tree")  # edited by hand after the bulk change
    assert caption_tools.undo(run) == (1, 2)
    assert [store.read_caption(run, n) for n in ("a.png", "c.png", "d.png")] == \
        ["a painting of a red circle, zkstyle", "an oak tree", ""]
    assert not (store.dataset_dir(run) / "b.png").exists() and not (store.dataset_dir(run) / "b.txt").exists()
    (store.dataset_dir(run) / caption_tools.UNDO_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable; edit the captions by hand"):
        caption_tools.undo(run)
    (store.dataset_dir(run) / caption_tools.UNDO_FILE).write_text(json.dumps({"before": ["a list"]}))
    with pytest.raises(UserError, match="unreadable"):
        caption_tools.undo(run)


@pytest.mark.parametrize("call,why", [
    (lambda r: caption_tools.replace_in_captions(r, "  ", "x"), "type the text to find"),
    (lambda r: caption_tools.add_trigger(r, ""), "type the trigger word first"),
    (lambda r: caption_tools.add_trigger(r, "zk, style"), "trigger word 'zk, style': give one word or phrase, "
                                                          "without commas"),  # it would become two tags
    (lambda r: caption_tools.replace_in_captions(r.parent / "empty", "a", "b"), "the dataset is empty"),
    (lambda r: caption_tools.add_trigger(r.parent / "empty", "zk"), "the dataset is empty"),
])
def test_bad_requests_are_one_clear_line_and_change_nothing(run, call, why):
    before = captions(run)
    with pytest.raises(UserError, match=why):
        call(run)
    assert captions(run) == before and not (run / "dataset" / caption_tools.UNDO_FILE).is_file()


def test_tag_counts_count_each_tag_once_per_caption(run):
    (store.dataset_dir(run) / "d.txt").write_text("zkstyle, a tree, zkstyle\n")
    counts, total = caption_tools.tag_counts(run)
    assert total == 4
    assert counts[:2] == [("a tree", 2), ("zkstyle", 2)]  # by count, then alphabetically
    assert dict(counts)["a painting of a red circle"] == 1
    assert caption_tools.tag_counts(run, top=1) == ([("a tree", 2)], 4)


def test_word_counts_count_each_content_word_once_per_caption(run):
    """For sentence captions: words of three letters or more, in any case, not function words ("the", "with")."""
    (store.dataset_dir(run) / "d.txt").write_text("The painting, with the painting's 3 trees\n")
    counts = dict(caption_tools.word_counts(run))
    assert counts["painting"] == 3  # a, b (any case) and d; "paintings" (c) is another word
    assert counts["tree"] == 1 and counts["trees"] == 1 and counts["painting's"] == 1
    assert not {"the", "with", "of", "a", "3"} & counts.keys()
    assert caption_tools.word_counts(run, top=1) == [("painting", 3)]


def test_the_trainer_ignores_the_undo_record(run):
    """The record lives in the dataset folder: the trainer must read only images and their captions."""
    from trainer.scan import scan_dataset

    caption_tools.add_trigger(run, "zkstyle")
    scan = scan_dataset(store.dataset_dir(run))
    assert sorted(item.path.name for item in scan.items) == ["a.png", "b.png", "c.png", "d.png"]
    captions = {item.path.name: item.caption for item in scan.items}
    assert all("zkstyle" in captions[n] for n in ("a.png", "b.png", "c.png"))
    assert captions["d.png"] == "d"  # no caption file: its file name's words (training puts the trigger first)

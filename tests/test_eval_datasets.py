"""Evaluation dataset readers (wtours.eval.datasets): layouts, frame lists, label mapping, errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wtours.errors import UserError
from wtours.eval.datasets import (
    load_mask,
    read_dataset,
    read_davis,
    read_ytvos,
    select_frames,
    split_ytvos,
    ytvos_categories,
    ytvos_lut,
)


def _png(path, arr, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode if mode != "RGB" else None)
    if mode == "P":
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * (256 * 3 - 9))
    im.save(path)


def _jpg(path, h=16, w=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def make_davis(root, videos=("a", "b"), frames=7, mask_value=1):
    for v in videos:
        for i in range(frames):
            _jpg(root / "JPEGImages" / "480p" / v / f"{i:05d}.jpg")
            m = np.zeros((16, 24), np.uint8)
            m[4:10, 5:15] = mask_value
            _png(root / "Annotations" / "480p" / v / f"{i:05d}.png", m)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(v + "\n" for v in videos))
    return root


def make_ytvos(root, objects, frames=3, with_val=True):
    """objects: {video: {instance id: category}}; each instance paints its own column band."""
    train = root / "train"
    meta = {"videos": {}}
    for v, objs in objects.items():
        for i in range(frames):
            name = f"{i * 5:05d}"
            _jpg(train / "JPEGImages" / v / f"{name}.jpg")
            m = np.zeros((16, 24), np.uint8)
            for j, inst in enumerate(sorted(objs)):
                m[:, 4 * j + 2 : 4 * j + 5] = inst
            _png(train / "Annotations" / v / f"{name}.png", m)
        meta["videos"][v] = {"objects": {str(i): {"category": c, "frames": []} for i, c in objs.items()}}
    (train / "meta.json").write_text(json.dumps(meta))
    if with_val:
        (root / "val.txt").write_text("".join(v + "\n" for v in objects))
    return root


def test_select_frames_is_deterministic_and_evenly_spaced():
    assert select_frames(10, 4) == [0, 3, 6, 9]
    assert select_frames(3, 4) == [0, 1, 2]
    assert select_frames(5, 0) == [0, 1, 2, 3, 4]
    assert select_frames(70, 4) == select_frames(70, 4)


def test_davis_layout_frame_lists_and_video_file(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    ds = read_davis(root, frames_per_clip=4)
    assert [s.name for s in ds.sequences] == ["a", "b"]
    assert ds.sequences[0].frame_ids == ["00000", "00002", "00004", "00006"]
    assert ds.sequences[0].n_annotated == 7
    assert all(f.stem == m.stem for s in ds.sequences for f, m in zip(s.frames, s.masks))
    assert read_davis(root, frames_per_clip=0).n_frames == 14
    lst = tmp_path / "list.txt"
    lst.write_text("# only b\nb\n\n")
    assert [s.name for s in read_dataset("davis", root, lst).sequences] == ["b"]


@pytest.mark.parametrize("missing,named", [
    ("Annotations/480p", "Annotations/480p"),
    ("JPEGImages/480p", "JPEGImages/480p"),
    ("ImageSets/2017/val.txt", "ImageSets/2017/val.txt"),
    ("Annotations/480p/b", "b"),
])
def test_davis_missing_parts_are_named(tmp_path, missing, named):
    root = make_davis(tmp_path / "DAVIS")
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=named.replace("/", ".")):
        read_davis(root)


def test_empty_video_list_is_an_error(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="empty"):
        read_davis(root)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        read_dataset("davis", root, empty)


def test_ytvos_categories_use_a_lookup_table_without_collisions(tmp_path):
    # Sorted categories: ape=1, cat=2, zebra=3. Video "v1": instance 1 is a zebra (-> 3), instance 3
    # is an ape (-> 1), instance 2 a cat (-> 2). Remapping in place, instance by instance (the
    # reference), would turn instance 1's pixels into 3 and then, at instance 3, into 1.
    root = make_ytvos(tmp_path / "YT", {"v1": {1: "zebra", 2: "cat", 3: "ape"}, "v2": {1: "cat"}})
    ds = read_ytvos(root, frames_per_clip=0)
    assert ds.categories == ["ape", "cat", "zebra"]
    assert ds.label_kind == "category"
    s = ds.sequences[0]
    m = load_mask(s.masks[0], s.lut, s.id_rule)
    assert m[0, 2] == 3 and m[0, 6] == 2 and m[0, 10] == 1 and m[0, 0] == 0
    s2 = ds.sequences[1]
    assert load_mask(s2.masks[0], s2.lut)[0, 2] == 2


def test_ytvos_lut_and_category_order():
    meta = {"videos": {"x": {"objects": {"1": {"category": "b"}, "2": {"category": "a"}}}}}
    assert ytvos_categories(meta) == ["a", "b"]
    lut = ytvos_lut(meta["videos"]["x"]["objects"], {"a": 1, "b": 2})
    assert lut[[0, 1, 2, 3, 255]].tolist() == [0, 2, 1, -1, 255]


def test_ytvos_unexpected_instance_id_is_an_error(tmp_path):
    root = make_ytvos(tmp_path / "YT", {"v1": {1: "cat", 2: "dog"}})
    meta = json.loads((root / "train" / "meta.json").read_text())
    del meta["videos"]["v1"]["objects"]["2"]
    (root / "train" / "meta.json").write_text(json.dumps(meta))
    s = read_ytvos(root).sequences[0]
    with pytest.raises(UserError, match=r"unexpected ids \[2\]"):
        load_mask(s.masks[0], s.lut, s.id_rule)


def test_ytvos_split_val_txt_and_seeded_fallback(tmp_path):
    objs = {f"v{i:02d}": {1: "cat"} for i in range(10)}
    root = make_ytvos(tmp_path / "YT", objs, frames=1, with_val=False)
    ds = read_ytvos(root)
    assert len(ds.sequences) == 2 and "20 %" in ds.split_note
    assert [s.name for s in ds.sequences] == split_ytvos(list(objs), 0.2, 0)
    assert split_ytvos(list(objs)) == split_ytvos(list(reversed(list(objs))))
    (root / "val.txt").write_text("v03\nv07\n")
    assert [s.name for s in read_ytvos(root).sequences] == ["v03", "v07"]
    # the train folder itself works as root too
    assert len(read_ytvos(root / "train").sequences) == 2
    (root / "train" / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json"):
        read_ytvos(root)


def test_davis_mask_checks(tmp_path):
    root = make_davis(tmp_path / "DAVIS", videos=("a",), frames=1, mask_value=77)
    s = read_davis(root).sequences[0]
    with pytest.raises(UserError, match=r"unexpected ids \[77\].*max_instance_id"):
        load_mask(s.masks[0], s.lut, s.id_rule)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(UserError, match="RGB"):
        load_mask(rgb, s.lut)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read mask"):
        load_mask(bad, s.lut)


def test_synth_root_reads_its_davis_folder(tmp_path):
    make_davis(tmp_path / "out" / "davis")
    ds = read_dataset("synth", tmp_path / "out")
    assert ds.name == "synth" and len(ds.sequences) == 2
    with pytest.raises(UserError, match="davis"):
        read_dataset("synth", tmp_path)


def test_unpaired_frames_and_annotations_are_errors_or_counted_skips(tmp_path):
    root = make_davis(tmp_path / "DAVIS", frames=5)
    gone = root / "Annotations" / "480p" / "b" / "00002.png"
    gone.unlink()
    with pytest.raises(UserError, match="missing annotation: video 'b' has frame 00002.jpg but no 00002.png") as e:
        read_davis(root)
    assert str(gone) in str(e.value) and "\n" not in str(e.value)
    ds = read_davis(root, frames_per_clip=0, missing="skip")
    assert [s.n_annotated for s in ds.sequences] == [5, 4] and ds.skipped == {"b": 1}
    assert "skipped 1 frame(s)" in ds.skip_note
    # an annotation whose frame is gone
    root2 = make_davis(tmp_path / "D2", frames=3)
    (root2 / "JPEGImages" / "480p" / "a" / "00001.jpg").unlink()
    with pytest.raises(UserError, match="annotation without its frame: video 'a' has no 00001.jpg"):
        read_davis(root2)
    # YTVOS too
    yt = make_ytvos(tmp_path / "YT", {"v1": {1: "cat"}}, frames=3)
    (yt / "train" / "Annotations" / "v1" / "00005.png").unlink()
    with pytest.raises(UserError, match="missing annotation: video 'v1' has frame 00005.jpg"):
        read_ytvos(yt)
    assert read_ytvos(yt, frames_per_clip=0, missing="skip").n_frames == 2


def test_hidden_files_are_ignored_and_odd_files_are_named(tmp_path):
    import os

    root = make_davis(tmp_path / "DAVIS", frames=3)
    (root / "JPEGImages" / "480p" / "a" / "._00000.jpg").write_bytes(b"\0")  # macOS companion file
    assert read_davis(root, frames_per_clip=0).n_frames == 6
    fifo = root / "Annotations" / "480p" / "a" / "00001.png"
    fifo.unlink()
    os.mkfifo(fifo)  # opening it would block
    with pytest.raises(UserError, match=r"annotation is not a regular file \(a FIFO\)") as e:
        read_davis(root)
    assert str(fifo) in str(e.value)


def test_negative_frames_per_clip_is_refused(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    with pytest.raises(UserError, match="frames_per_clip must be >= 0"):
        read_dataset("davis", root, frames_per_clip=-1)


def test_random_frames_are_sorted_distinct_seeded_and_redrawn():
    """Issue 12 / timet.md §2.2: the reference draws 4 random sorted frames per video (with replacement only when
    a video is shorter)."""
    draw = lambda n, seed: select_frames(n, 4, "random", np.random.default_rng(seed))  # noqa: E731
    a = draw(70, 1)
    assert len(a) == 4 and a == sorted(a) and len(set(a)) == 4 and all(0 <= i < 70 for i in a)
    assert a == draw(70, 1)
    assert len({tuple(draw(70, s)) for s in range(10)}) > 5  # a new draw per seed
    short = draw(3, 0)
    assert len(short) == 4 and short == sorted(short) and set(short) <= {0, 1, 2}  # with replacement
    assert select_frames(5, 0, "random", np.random.default_rng(0)) == [0, 1, 2, 3, 4]  # 0: all of them
    with pytest.raises(ValueError):
        select_frames(5, 2, "random")


def test_davis_random_draws_differ_per_video_and_per_draw(tmp_path):
    root = make_davis(tmp_path / "DAVIS", videos=("a", "b", "c"), frames=30)
    d0 = read_dataset("davis", root, frames_per_clip=4, sampling="random", draw_seed=1)
    d0_again = read_dataset("davis", root, frames_per_clip=4, sampling="random", draw_seed=1)
    d1 = read_dataset("davis", root, frames_per_clip=4, sampling="random", draw_seed=2)
    ids = lambda d: [s.frame_ids for s in d.sequences]  # noqa: E731
    assert ids(d0) == ids(d0_again) and ids(d0) != ids(d1)
    assert len({tuple(x) for x in ids(d0)}) == 3  # not the same frames in every video
    assert all(f.stem == m.stem for s in d0.sequences for f, m in zip(s.frames, s.masks))
    with pytest.raises(UserError, match="frame_sampling must be one of even, random"):
        read_dataset("davis", root, sampling="uniform")


def test_davis_annotation_set_is_chosen_and_recorded(tmp_path):
    root = make_davis(tmp_path / "DAVIS")
    assert read_davis(root).annotations == "Annotations/480p"
    with pytest.raises(UserError, match="missing DAVIS annotation folder Annotations_unsupervised/480p"):
        read_dataset("davis", root, annotations="Annotations_unsupervised")
    for v in ("a", "b"):  # the DAVIS-2017 Unsupervised masks: another folder, other ids
        for i in range(7):
            m = np.zeros((16, 24), np.uint8)
            m[0:3, 0:3] = 2
            _png(root / "Annotations_unsupervised" / "480p" / v / f"{i:05d}.png", m)
    ds = read_dataset("davis", root, annotations="Annotations_unsupervised")
    assert ds.annotations == "Annotations_unsupervised/480p"
    assert all("Annotations_unsupervised" in str(p) for s in ds.sequences for p in s.masks)
    assert int(load_mask(ds.sequences[0].masks[0], ds.sequences[0].lut).max()) == 2

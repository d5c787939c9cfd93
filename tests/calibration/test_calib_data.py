"""Data sources: .npz/.npy files and folders, image folders, int64 inputs, and bad data."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from qdqsurgeon.calibration import Preprocess, open_data, random_data
from qdqsurgeon.errors import DataError, UsageError


def image_model(batch: int | str = 1, hw: tuple[int | str, int | str] = (8, 8)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def token_model() -> onnx.ModelProto:
    """MiniLM-style: three int64 [batch, seq] inputs."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in names]
    nodes = [
        helper.make_node("Add", ["input_ids", "token_type_ids"], ["s"]),
        helper.make_node("Mul", ["s", "attention_mask"], ["m"]),
        helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "tok", inputs, [out]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(src):
    return [{k: v.copy() for k, v in b.items()} for b in src]


def test_npz_static_batch_is_chunked(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8))  # float64: cast silently
    np.savez(tmp_path / "d.npz", x=x)
    src = open_data(tmp_path / "d.npz", image_model(batch=1))
    assert len(src) == 5
    got = batches(src)
    assert [b["x"].shape for b in got] == [(1, 3, 8, 8)] * 5
    assert got[0]["x"].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b["x"] for b in got]), x.astype(np.float32))
    assert len(batches(src)) == 5  # re-iterable


def test_npz_static_batch_drops_incomplete_last_batch(tmp_path, caplog):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    src = open_data(tmp_path / "d.npz", image_model(batch=2))
    assert len(src) == 2
    with caplog.at_level(logging.WARNING):
        assert [b["x"].shape[0] for b in src] == [2, 2]
    assert "dropping the last 1" in caplog.text


def test_dynamic_batch_uses_batch_size(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3, 8, 8), np.float32))
    assert [b["x"].shape[0] for b in open_data(tmp_path / "d.npz", image_model(batch="N"))] == [1] * 5
    src = open_data(tmp_path / "d.npz", image_model(batch="N"), batch_size=2)
    assert len(src) == 3 and [b["x"].shape[0] for b in src] == [2, 2, 1]
    with pytest.raises(DataError, match="fixed at 1"):
        open_data(tmp_path / "d.npz", image_model(batch=1), batch_size=4)


def test_folder_of_npy_samples_and_batches(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 8, 8)).astype(np.float32)  # one sample, no batch axis
    b = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)  # two samples
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)  # sorted by name: a first
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_data(tmp_path, image_model(batch="N"), batch_size=3)
    (only,) = batches(src)
    np.testing.assert_array_equal(only["x"], np.concatenate([a[None], b]))


def test_folder_of_npz(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", x=np.full((1, 3, 8, 8), i, np.float32))
    got = batches(open_data(tmp_path, image_model()))
    assert [float(b["x"][0, 0, 0, 0]) for b in got] == [0.0, 1.0, 2.0]


def test_int64_inputs_from_npz(tmp_path):
    ids = np.array([[101, 2023, 102, 0], [101, 7, 8, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int32)  # int32 -> int64 is the same kind: accepted
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    src = open_data(tmp_path / "tok.npz", token_model())
    got = batches(src)
    assert len(got) == 2
    assert got[0]["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(got[1]["input_ids"], ids[1:])
    # The feeds run as they are.
    from qdqsurgeon.calibration import make_session

    out = make_session(token_model()).run(None, got[0])[0]
    np.testing.assert_array_equal(out, (ids[:1] * mask[:1]).astype(np.float32))


def write_images(folder, sizes):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_image_folder_default_preprocess(tmp_path):
    write_images(tmp_path / "imgs", [(20, 10), (8, 8), (9, 30)])
    src = open_data(tmp_path / "imgs", image_model(hw=(8, 8)))
    got = batches(src)
    assert len(got) == 3
    for b in got:
        assert b["x"].shape == (1, 3, 8, 8) and b["x"].dtype == np.float32
        assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0


def test_image_preprocess_values(tmp_path):
    """A flat-colour image makes every step checkable by hand."""
    tmp_path.joinpath("imgs").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 51)).save(tmp_path / "imgs" / "red.png")
    pre = Preprocess.parse("size=4x6,mean=0.5/0.5/0.5,std=0.5/0.25/1,scale=1/255,order=BGR,layout=NHWC,resize=stretch")
    model = image_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 6
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 3
    (b,) = batches(open_data(tmp_path / "imgs", model, pre))
    assert b["x"].shape == (1, 4, 6, 3)
    np.testing.assert_allclose(b["x"][0, 0, 0], [(0.2 - 0.5) / 0.5, (0.0 - 0.5) / 0.25, 1.0 - 0.5], atol=1e-6)


def test_letterbox_pads_with_grey(tmp_path):
    tmp_path.joinpath("imgs").mkdir()
    Image.new("RGB", (16, 8), (0, 0, 0)).save(tmp_path / "imgs" / "wide.png")
    pre = Preprocess(size=(16, 16), resize="letterbox", scale=1.0)
    (b,) = batches(open_data(tmp_path / "imgs", image_model(hw=(16, 16)), pre))
    x = b["x"][0, 0]
    assert x[0, 0] == 114.0 and x[8, 8] == 0.0 and x[15, 15] == 114.0


def test_preprocess_from_model_and_parse():
    assert Preprocess.from_model(image_model(hw=(32, 48))).size == (32, 48)
    assert Preprocess.from_model(image_model(hw=("h", "w"))).size == (224, 224)
    p = Preprocess.parse("size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,scale=1/255,order=RGB,layout=NCHW,resize=crop")
    assert p.size == (224, 224) and p.mean == (0.485, 0.456, 0.406) and p.scale == pytest.approx(1 / 255)
    for bad in ("size=abc", "colour=red", "resize=zoom", "mean", "std=0/1/1"):
        with pytest.raises(UsageError):
            Preprocess.parse(bad)


def test_random_data_warns(caplog):
    with caplog.at_level(logging.WARNING):
        src = random_data(token_model(), 3, seed=1)
    assert "smoke test" in caplog.text
    got = batches(src)
    assert len(src) == 3 == len(got)
    assert set(got[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert got[0]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(batches(random_data(token_model(), 3, seed=1))[2]["input_ids"], got[2]["input_ids"])
    (img,) = batches(random_data(image_model(batch=1, hw=("h", "w")), 1))
    assert img["x"].shape == (1, 3, 224, 224)


# ----------------------------------------------------------------------------- bad data


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file") as info:
        open_data(tmp_path / "nope.npz", image_model())
    assert "nope.npz" in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty"):
        open_data(tmp_path, image_model())


def test_wrong_input_names(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"expected \['x'\], got \['image'\]"):
        open_data(tmp_path / "d.npz", image_model())


def test_wrong_shape(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(DataError, match=r"d.npz: input 'x': the file's array has shape \[1, 3, 9, 8\].*axis 2 the data has 9, the model 8"):
        open_data(tmp_path / "d.npz", image_model())
    np.savez(tmp_path / "r.npz", x=np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="rank 2"):
        open_data(tmp_path / "r.npz", image_model())


def test_wrong_rank_names_the_files_shape_and_the_models(tmp_path):
    """A rank-3 batch for a rank-4 input was reported as shape [1, 5, 8, 8], neither the file's nor the model's."""
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 8, 8), np.float32))
    with pytest.raises(DataError) as err:
        open_data(tmp_path / "d.npz", image_model())
    msg = str(err.value)
    assert "the file's array has shape [5, 8, 8] (rank 3" in msg and "[1, 5, 8, 8]" not in msg
    assert "the model's is float32 [1, 3, 8, 8] (rank 4)" in msg


def test_wrong_dtype(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 8, 8), np.int64))
    with pytest.raises(DataError, match="int vs float"):
        open_data(tmp_path / "d.npz", image_model())
    np.savez(tmp_path / "t.npz", input_ids=np.zeros((1, 4)), attention_mask=np.zeros((1, 4)), token_type_ids=np.zeros((1, 4)))
    with pytest.raises(DataError, match="float vs int"):
        open_data(tmp_path / "t.npz", token_model())


def test_pickled_npy_is_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"evil": 1}, [1, 2]
    np.save(tmp_path / "p.npy", obj, allow_pickle=True)
    with pytest.raises(DataError, match="pickled") as info:
        open_data(tmp_path / "p.npy", image_model())
    assert "p.npy" in str(info.value)


def test_npy_needs_single_input_model(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 4), np.int64))
    with pytest.raises(DataError, match="3 inputs"):
        open_data(tmp_path / "a.npy", token_model())


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        open_data(tmp_path / "bad.npz", image_model())
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="bad.npy"):
        open_data(tmp_path / "bad.npy", image_model())
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        open_data(imgs, image_model())


def test_too_few_samples_for_static_batch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="fewer than one batch of 4"):
        open_data(tmp_path / "d.npz", image_model(batch=4))


def test_images_need_an_image_model(tmp_path):
    write_images(tmp_path / "imgs", [(8, 8)])
    with pytest.raises(DataError, match="one float rank-4 input"):
        open_data(tmp_path / "imgs", token_model())


def test_preprocess_size_must_fit_the_model(tmp_path):
    write_images(tmp_path / "imgs", [(8, 8)])
    with pytest.raises(DataError, match="preprocess NCHW size 16x16"):
        open_data(tmp_path / "imgs", image_model(hw=(8, 8)), Preprocess(size=(16, 16)))

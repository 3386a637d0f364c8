"""The scene judge (tasks/scene_judge.py): GenEval-style scores, detection decoding, recolouring,
and the scene annotations it learns from (datamodules/decode.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.decode import MAX_OBJECTS, BadSample, SampleDecoder, read_objects
from datamodules.shards import encode_png
from tasks.scene_judge import GROUPS, SceneJudge, SceneScores, score_scene, unseen_mask

# rows: x, y in [0, 1], then colour, shape, size indices
A = [0.25, 0.5, 0, 1, 1]  # a large red square on the left
B = [0.75, 0.5, 2, 0, 0]  # a small blue circle on the right


def test_a_perfect_scene_scores_one_everywhere() -> None:
    scores = score_scene(np.array([B, A]), np.array([A, B]))  # detection order does not matter
    assert scores == {"count": 1.0, "attr0": 1.0, "attr1": 1.0, "attr2": 1.0, "relation": 1.0, "all": 1.0}


def test_each_mistake_shows_in_its_own_score() -> None:
    wrong_colour = [0.75, 0.5, 3, 0, 0]
    s = score_scene(np.array([A, wrong_colour]), np.array([A, B]))
    assert (s["count"], s["attr0"], s["attr1"], s["relation"], s["all"]) == (1.0, 0.5, 1.0, 1.0, 0.0)
    swapped = [[0.75, 0.5, *A[2:]], [0.25, 0.5, *B[2:]]]  # right objects, on the wrong sides
    s = score_scene(np.array(swapped), np.array([A, B]))
    assert s["attr1"] == 1.0 and s["relation"] == 0.0 and s["all"] == 0.0
    s = score_scene(np.array([A]), np.array([A, B]))  # one object missing: wrong in everything
    assert (s["count"], s["attr0"], s["relation"], s["all"]) == (0.0, 0.5, 0.0, 0.0)
    s = score_scene(np.array([A, B, B]), np.array([A, B]))  # one too many
    assert s["count"] == 0.0 and s["attr1"] == 1.0 and s["all"] == 0.0
    s = score_scene(np.zeros((0, 5)), np.array([A]))
    assert s["count"] == 0.0 and s["all"] == 0.0 and "relation" not in s


def _rows(*objects: list[float]) -> torch.Tensor:
    out = torch.full((MAX_OBJECTS, 5), -1.0)
    out[: len(objects)] = torch.tensor(objects)
    return out


def test_scores_are_grouped_by_object_count_and_seen_combinations() -> None:
    metric = SceneScores(["colour", "shape", "size"])
    described = torch.stack([_rows(A), _rows(A, B)])
    unseen = unseen_mask(described, [{0: 2, 1: 0}])  # blue circles held out
    assert unseen.tolist() == [False, True]
    metric.update([torch.tensor([A]), torch.tensor([A])], described, unseen)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["scene/1_object/all"] == 1.0 and out["scene/seen/all"] == 1.0
    assert out["scene/2_objects/count"] == 0.0 and out["scene/unseen/colour"] == 0.5
    assert out["scene/all_captions/all"] == 0.5 and out["scene/all_captions/relation"] == 0.0
    assert "scene/3_objects/all" not in out and "scene/1_object/relation" not in out


def test_one_object_captions_are_broken_down_by_one_attribute() -> None:
    metric = SceneScores(["colour", "shape", "size"], breakdown=("size", ["small", "large"]))
    described = torch.stack([_rows(A), _rows(B), _rows(B), _rows(A, B)])  # large, small, small, two objects
    right_small = [0.75, 0.5, 2, 0, 0]
    metric.update([torch.tensor([A]), torch.tensor([right_small]), torch.tensor([[0.75, 0.5, 2, 1, 0]]),
                   torch.tensor([A, B])], described, torch.zeros(4, dtype=torch.bool))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["scene/1_object_size=large/all"] == 1.0  # one caption, right
    assert out["scene/1_object_size=small/all"] == 0.5 and out["scene/1_object_size=small/shape"] == 0.5
    assert out["scene/1_object/all"] == pytest.approx(2 / 3) and out["scene/all_captions/all"] == 0.75
    assert not any("2_objects_" in k for k in out)  # only one-object captions are broken down
    assert SceneScores(["colour", "shape", "size"]).groups == [*GROUPS, "all_captions"]
    with pytest.raises(ValueError, match="breakdown attribute 'count' is not one of"):
        SceneScores(["colour", "shape", "size"], breakdown=("count", ["one"]))


def test_detect_reads_peaks_offsets_and_attributes() -> None:
    judge = SceneJudge(3, [6, 5, 2], width=8, colour_index=0)
    logit = torch.full((1, 4, 4), -9.0)
    logit[0, 1, 2] = 5.0  # an object in cell (x=2, y=1) ...
    logit[0, 1, 3] = 4.0  # ... and a weaker neighbour: not a peak
    offset = torch.full((1, 2, 4, 4), 0.5)
    attrs = [torch.zeros(1, k, 4, 4) for k in (6, 5, 2)]
    attrs[0][0, 4, 1, 2] = attrs[1][0, 3, 1, 2] = attrs[2][0, 1, 1, 2] = 1.0
    judge.forward = lambda x, geometry_input=None: (logit, offset, attrs)  # type: ignore[method-assign]
    (found,) = judge.detect(torch.zeros(1, 3, 16, 16))
    assert found.tolist() == [[2.5 / 4, 1.5 / 4, 4.0, 3.0, 1.0]]


def test_recolour_permutes_channels_and_keeps_shapes() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4) * 2 - 1
    y = SceneJudge.recolour(x)
    assert torch.allclose(y.abs().sort(1).values, x.abs().sort(1).values)
    assert not torch.equal(y, x)


def test_the_judge_trains_and_its_loss_falls() -> None:
    torch.manual_seed(0)
    judge = SceneJudge(3, [6, 5, 2], width=8, colour_index=0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    objects = torch.stack([_rows(A), _rows(A, B), _rows(B), _rows([0.1, 0.9, 5, 4, 1])])
    opt = torch.optim.Adam(judge.parameters(), 1e-2)
    first = None
    for _ in range(30):
        loss, logs = judge.loss(x, objects)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first and set(logs) == {"objectness", "attributes", "attr_acc_min"}


ATTRS = {"colour": ["red", "blue"], "shape": ["circle", "square"]}


def test_objects_map_to_the_decoded_image() -> None:
    """Centres follow the resize and centre crop: a 64 x 32 image decoded at 16 px drops 16 source
    pixels on the left."""
    sample = {"json": json.dumps({"objects": [{"x": 32, "y": 8, "colour": "blue", "shape": "circle"}]})}
    rows = read_objects(sample, ATTRS, (0.5 / 16, 16.0, 0.0))
    assert rows.shape == (MAX_OBJECTS, 4) and rows[0].tolist() == [0.5, 0.25, 1.0, 0.0]
    assert (rows[1:] == -1).all()
    png = encode_png(Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8)))
    out = SampleDecoder(keys=("image", "objects"), image_size=16, attributes=ATTRS)({"__key__": "k", "png": png, **sample})
    assert out["objects"][0].tolist() == [0.5, 0.25, 1.0, 0.0]


@pytest.mark.parametrize("member, reason", [
    (None, "missing_objects"),
    (b"{not json", "bad_objects"),
    (json.dumps({"objects": []}), "bad_objects"),
    (json.dumps({"objects": [{"x": 1, "y": 1, "colour": "mauve", "shape": "circle"}]}), "bad_objects"),
    (json.dumps({"objects": [{"x": 1, "y": 1, "colour": "red"}]}), "bad_objects"),
    (json.dumps({"objects": [{"x": 1, "y": 1, "colour": "red", "shape": "circle"}] * (MAX_OBJECTS + 1)}), "bad_objects"),
])
def test_bad_annotations_are_counted_skips(member, reason) -> None:
    sample = {} if member is None else {"json": member}
    with pytest.raises(BadSample) as err:
        read_objects(sample, ATTRS, None)
    assert err.value.reason == reason


def test_the_head_refuses_data_with_other_attributes() -> None:
    from tasks import GenerationHead

    head = GenerationHead(condition="text", num_classes=5, scene_attributes={"colour": 6, "shape": 5})
    assert "objects" in head.required_keys
    with pytest.raises(ValueError, match=r"scene_attributes=\{'colour': 6, 'shape': 5\}.*\{'colour': 2, 'shape': 2\}"):
        head._bind_attributes(ATTRS, "shapes", [])
    head = GenerationHead(condition="text", num_classes=5, scene_attributes={"colour": 2, "shape": 2})
    head._bind_attributes(ATTRS, "shapes", [{"shape": "square", "colour": "blue"}])
    assert head._heldout == [{1: 1, 0: 1}]
    with pytest.raises(ValueError, match="for images"):
        GenerationHead(modality="audio", num_classes=5, scene_attributes={"colour": 2})


def test_the_head_checks_its_scene_breakdown() -> None:
    from tasks import GenerationHead

    kwargs = {"condition": "text", "num_classes": 5, "scene_attributes": {"colour": 2, "shape": 2}}
    head = GenerationHead(**kwargs, scene_breakdown={"shape": ["circle", "square"]})
    head._bind_attributes(ATTRS, "shapes", [])
    scores = head.build_metrics(None)["scene"]  # type: ignore[arg-type]
    assert scores.groups[-3:] == ["1_object_shape=circle", "1_object_shape=square", "all_captions"]
    with pytest.raises(ValueError, match=r"values \['square', 'circle'\] but the data's info.json has \['circle', 'square'\]"):
        GenerationHead(**kwargs, scene_breakdown={"shape": ["square", "circle"]})._bind_attributes(ATTRS, "shapes", [])
    with pytest.raises(ValueError, match="names 3 values of 'shape' but scene_attributes gives it 2"):
        GenerationHead(**kwargs, scene_breakdown={"shape": ["circle", "square", "cross"]})
    with pytest.raises(ValueError, match="'size' is not one of scene_attributes"):
        GenerationHead(**kwargs, scene_breakdown={"size": ["small", "large"]})
    with pytest.raises(ValueError, match="takes one attribute"):
        GenerationHead(**kwargs, scene_breakdown={"shape": ["circle", "square"], "colour": ["red", "blue"]})

"""The registry: names, configs, errors that list the valid names, label sets."""

from __future__ import annotations

import pytest

import engine.models as M
from engine.models import labels


class TestRegistry:
    def test_every_family_has_configs_and_a_tiny_one(self):
        for family in M.FAMILIES:
            assert M.list_models(family), family
            assert M.list_models(family, tiny=True), f"{family} has no tiny config"

    def test_list_all_is_family_qualified(self):
        names = M.list_models()
        assert "detector/yolov8n_tiny" in names and "segmenter/sam_vit_b" in names
        assert {n.split("/")[0] for n in names} == set(M.FAMILIES)

    def test_required_architectures_are_registered(self):
        assert {"yolov8n", "yolov8s", "yolov8m", "yolo11n", "yolo11s", "yolo11m"} <= set(M.list_models("detector"))
        assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_tiny"} <= set(M.list_models("segmenter"))

    def test_unknown_name_lists_the_valid_ones(self):
        with pytest.raises(M.UnknownModelError) as err:
            M.create_detector("yolov99z")
        msg = str(err.value)
        assert "yolov99z" in msg
        for name in M.list_models("detector"):
            assert name in msg

    def test_unknown_name_is_the_engine_wide_error(self):
        from engine.errors import UnknownNameError

        with pytest.raises(UnknownNameError):
            M.get_config("segmenter", "sam_vit_x")

    def test_unknown_family_lists_the_families(self):
        with pytest.raises(M.UnknownModelError, match="detector, segmenter, classifier, fusion"):
            M.create_model("diffuser", "x")
        with pytest.raises(M.UnknownModelError):
            M.list_models("diffuser")

    def test_bad_override_names_the_builder_arguments(self):
        with pytest.raises(M.ModelConfigError, match="arch") as err:
            M.create_classifier("resnet10t", depth=3)
        assert "classifier/resnet10t" in str(err.value)

    def test_override_changes_the_model(self):
        model = M.create_classifier("resnet10t", grades=["good", "bad"])
        assert model.heads["grade"].out_features == 2
        assert model.config.args["grades"] == ["good", "bad"]


class TestLabels:
    def test_label_sets_are_resolved_and_recorded(self):
        model = M.create_fusion("fusion_tiny")
        args = model.config.args
        assert args["materials"] == list(labels.material_names())
        assert len(args["materials"]) == 12
        assert args["grades"] == ["A", "B", "C", "D"]
        assert args["defect_classes"] == list(labels.defect_class_names())
        assert model.segment_classes == ("background", *labels.defect_class_names())

    def test_names_are_engine_synths(self):
        import engine.synth

        assert labels.material_names() == tuple(engine.synth.MATERIALS)
        assert labels.defect_class_names() == tuple(engine.synth.DEFECT_CLASSES)

    def test_defect_classes(self):
        assert labels.defect_class_names() == ("pore", "crack", "inclusion", "scratch", "void")
        det = M.create_detector("yolov8n_tiny")
        assert det.names == labels.defect_class_names()
        assert det.model.yaml["nc"] == 5


def test_an_unknown_timm_architecture_names_close_ones():
    import engine.models as M

    for create in (M.create_classifier, M.create_fusion):
        with pytest.raises(M.ModelConfigError, match="unknown timm architecture 'resnet10'.*resnet10t"):
            create("resnet10t" if create is M.create_classifier else "fusion_tiny", arch="resnet10")

"""Every public entry point refuses bad arguments the same way: a config field of the wrong type or a
non-finite number is a ValueError / TypeError whose message names the field, whether the config is
built in Python, read back from JSON, changed after construction, or loaded from a checkpoint
(then an AdapterError, a ValueError too, naming the field as the file spells it)."""
import dataclasses
import json

import pytest

import ptune_rt
from ptune_rt import LoRAConfig, PrefixConfig, PromptTuningConfig, PTuningConfig
from ptune_rt.io import AdapterError

from helpers_models import assert_unchanged, snapshot, tiny_llama

NAN, INF = float("nan"), float("inf")
#: kind of field -> values of the wrong type or out of range (None is refused where the field is required)
BAD = {
    "int": [1.5, "2", True, NAN, None, 0],
    "opt_int": [1.5, "2", True, 0],
    "rate": [NAN, INF, "0.1", True, None, [0.1], 1.0, -0.1],
    "positive": [NAN, INF, -INF, "8", True, None, 0.0],
    "bool": ["true", 1, None, 0],
    "choice": [1, None, ["auto"], "nope"],
    "names": ["classifier", [1], [""]],
    "opt_str": [5],
    "anchors": [["x"], {"x": 1}, {1: "x"}],
    "targets": [5, [1], ["q_proj", ""], "(", ("q_proj", 3)],
    "rank_pattern": [["q_proj"], {"q_proj": 0}, {"q_proj": 1.5}, {"(": 2}, {"": 2}],
    "alpha_pattern": [["q_proj"], {"q_proj": 0}, {"q_proj": NAN}, {"(": 2.0}],
    "layers": [-1, "0", [1.5], True, [True]],
    "layers_pattern": [5, [""], ["layers", 3]],
    "token_indices": [[], [-1], [1, 1], {"embed_tokens": []}, {"": [1]}, "1", [True]],
}
FIELDS = {
    LoRAConfig: {"r": "int", "alpha": "positive", "dropout": "rate", "target_modules": "targets", "bias": "choice",
                 "use_rslora": "bool", "init": "choice", "backend": "choice", "recompute_mlp": "bool",
                 "group_projections": "bool", "modules_to_save": "names", "use_dora": "bool",
                 "lora_bias": "bool", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
                 "layers_to_transform": "layers", "trainable_token_indices": "token_indices",
                 "layers_pattern": "layers_pattern"},
    PrefixConfig: {"num_virtual_tokens": "int", "prefix_projection": "bool", "encoder_hidden_size": "opt_int",
                   "position_mode": "choice", "dropout": "rate", "backend": "choice", "num_tasks": "int",
                   "modules_to_save": "names"},
    PromptTuningConfig: {"num_virtual_tokens": "int", "init": "choice", "num_tasks": "int", "backend": "choice",
                         "modules_to_save": "names", "placement": "choice"},
    PTuningConfig: {"num_virtual_tokens": "int", "encoder": "choice", "encoder_hidden_size": "opt_int",
                    "encoder_num_layers": "int", "encoder_dropout": "rate", "template": "opt_str",
                    "anchors": "anchors", "num_tasks": "int", "backend": "choice", "modules_to_save": "names",
                    "placement": "choice"},
}
REQUIRED = {PromptTuningConfig: {"num_virtual_tokens": 3}, PTuningConfig: {"num_virtual_tokens": 3}}
CASES = [(cls, f, v) for cls, fields in FIELDS.items() for f, kind in fields.items() for v in BAD[kind]]


def case_id(case) -> str:
    cls, f, v = case
    return f"{cls.__name__}.{f}={v!r}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_config_field_refused_everywhere(case):
    """Built directly, through from_dict (a checkpoint's JSON), and changed after construction then
    validated (as apply does): the same error, naming the field."""
    cls, field, value = case
    name = rf"{cls.__name__}\.{field}"
    with pytest.raises((ValueError, TypeError), match=name):
        cls(**{**REQUIRED.get(cls, {}), field: value})
    with pytest.raises((ValueError, TypeError), match=name):
        cls.from_dict({**cls(**REQUIRED.get(cls, {})).to_dict(), field: value})
    config = cls(**REQUIRED.get(cls, {}))
    setattr(config, field, value)
    with pytest.raises((ValueError, TypeError), match=name):
        config.validate()


def test_every_config_field_is_covered():
    for cls, fields in FIELDS.items():
        unchecked = {f.name for f in dataclasses.fields(cls)} - set(fields)
        assert unchecked <= {"tokenizer", "init_text"}, (cls, unchecked)  # any tokenizer; init_text: below


def test_init_text_is_checked_against_init():
    with pytest.raises(ValueError, match="PromptTuningConfig.init_text"):
        PromptTuningConfig(3, init="text", init_text=5, tokenizer="t")
    with pytest.raises(ValueError, match="PromptTuningConfig.init_text"):
        PromptTuningConfig(3, init_text="x")


def test_apply_validates_a_config_changed_after_construction():
    config = LoRAConfig(r=4, target_modules=["q_proj"])
    config.alpha = NAN
    model = tiny_llama(layers=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"LoRAConfig\.alpha"):
        ptune_rt.apply(model, config)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------------------------
# loaders: the same checks on what a checkpoint's config says
# ----------------------------------------------------------------------------------------------

def saved(tmp_path, method: str, fmt: str):
    configs = {"lora": LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), "prefix": PrefixConfig(3),
               "prompt_tuning": PromptTuningConfig(3), "p_tuning": PTuningConfig(3)}
    model = ptune_rt.apply(tiny_llama(layers=1), configs[method])
    ptune_rt.save_adapter(model, tmp_path, format=fmt)
    return tmp_path / ("adapter_config.json" if fmt == "peft" else "ptune_config.json")


def refused(directory, match: str) -> None:
    """Loading ``directory`` raises AdapterError matching ``match``, into a plain and a fitted model
    alike, and changes neither."""
    model = tiny_llama(layers=1)
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=match):
        ptune_rt.load_adapter(model, directory)
    assert_unchanged(model, snap)


OWN_CASES = [("lora", cls_f, v) for cls_f, v in (("alpha", NAN), ("alpha", True), ("dropout", "0.1"), ("r", 4.0),
                                                  ("use_rslora", "no"), ("target_modules", "("), ("bias", 3))]
OWN_CASES += [("prefix", f, v) for f, v in (("dropout", INF), ("num_virtual_tokens", "3"), ("prefix_projection", 1),
                                             ("position_mode", None), ("modules_to_save", "score"))]
OWN_CASES += [("p_tuning", f, v) for f, v in (("encoder_dropout", NAN), ("encoder_num_layers", 2.0),
                                               ("num_tasks", True), ("anchors", [1]))]
OWN_CASES += [("prompt_tuning", f, v) for f, v in (("init", 0), ("backend", ["torch"]))]
CLASS = {"lora": "LoRAConfig", "prefix": "PrefixConfig", "prompt_tuning": "PromptTuningConfig",
         "p_tuning": "PTuningConfig"}


@pytest.mark.parametrize("method,field,value", OWN_CASES, ids=[f"{m}.{f}={v!r}" for m, f, v in OWN_CASES])
def test_own_format_config_field_refused(tmp_path, method, field, value):
    cfg_file = saved(tmp_path, method, "ptune")
    d = json.loads(cfg_file.read_text())
    d["config"][field] = value
    cfg_file.write_text(json.dumps(d))
    refused(tmp_path, rf"ptune_config.json: invalid .*{CLASS[method]}\.{field}")


#: (method, path to a field of ptune_config.json, bad value, what the error names)
FINGERPRINT_CASES = [("lora", ["targets", 0, "in_features"], "64", "'targets'"),
                     ("lora", ["targets", 0, "out_features"], 64.0, "'targets'"),
                     ("lora", ["targets", 0, "in_features"], True, "'targets'"),
                     ("lora", ["targets", 0, "kind"], "conv", "'targets'"),
                     ("lora", ["model"], "llama", "'model'"), ("lora", ["model", "model_type"], 5, "'model'"),
                     ("lora", ["modules_to_save"], "score", "'modules_to_save'"),
                     ("prefix", ["prefix", "num_layers"], 1.0, "'num_layers'"),
                     ("prefix", ["model"], ["llama"], "'model'"),
                     ("prompt_tuning", ["prompt", "hidden_size"], "64", "'hidden_size'"),
                     ("prompt_tuning", ["modules_to_save"], [3], "'modules_to_save'")]


@pytest.mark.parametrize("method,where,value,named", FINGERPRINT_CASES,
                         ids=[f"{m}.{'.'.join(map(str, w))}={v!r}" for m, w, v, _ in FINGERPRINT_CASES])
def test_own_format_fingerprint_field_refused(tmp_path, method, where, value, named):
    cfg_file = saved(tmp_path, method, "ptune")
    d = json.loads(cfg_file.read_text())
    node = d
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    cfg_file.write_text(json.dumps(d))
    refused(tmp_path, rf"ptune_config.json.*{named}")


#: (method, field of adapter_config.json, bad value, what the error says)
PEFT_CASES = [("lora", "r", 4.5, "r must be"), ("lora", "r", "4", "r must be"),
              ("lora", "lora_alpha", NAN, "lora_alpha must be"), ("lora", "lora_alpha", "8", "lora_alpha must be"),
              ("lora", "lora_dropout", INF, "lora_dropout must be"),
              ("lora", "use_rslora", "false", "use_rslora must be"),
              ("lora", "target_modules", 7, "target_modules must be"),
              ("lora", "target_modules", "(x", "target_modules='\\(x' is not a valid regular expression"),
              ("lora", "exclude_modules", "(x", "exclude_modules='\\(x' is not a valid regular expression"),
              ("lora", "exclude_modules", [3], "exclude_modules must be"),
              ("lora", "modules_to_save", "score", "'modules_to_save' must be"),
              ("lora", "bias", None, "LoRAConfig.bias must be"),
              ("prefix", "num_virtual_tokens", 3.0, "'num_virtual_tokens' must be"),
              ("prefix", "num_layers", "1", "'num_layers' must be"),
              ("prefix", "token_dim", True, "'token_dim' must be"),
              ("prefix", "prefix_projection", "no", "'prefix_projection' must be"),
              ("prefix", "modules_to_save", "score", "'modules_to_save' must be"),
              ("prefix", "task_type", 5, "task_type 5 is not one of"),
              ("prompt_tuning", "num_virtual_tokens", NAN, "'num_virtual_tokens' must be"),
              ("prompt_tuning", "token_dim", 64.0, "'token_dim' must be"),
              ("prompt_tuning", "modules_to_save", [None], "'modules_to_save' must be")]


@pytest.mark.parametrize("method,field,value,says", PEFT_CASES, ids=[f"{m}.{f}={v!r}" for m, f, v, _ in PEFT_CASES])
def test_peft_config_field_refused(tmp_path, method, field, value, says):
    cfg_file = saved(tmp_path, method, "peft")
    d = json.loads(cfg_file.read_text())
    d[field] = value
    cfg_file.write_text(json.dumps(d))
    refused(tmp_path, rf"adapter_config.json.*{says}")


# ----------------------------------------------------------------------------------------------
# entry points beyond the configs
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def lora_model():
    return ptune_rt.apply(tiny_llama(layers=1), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("names,match", [("ab", "adapter_names must be a sequence"),
                                         ([1, None], "adapter_names must hold"),
                                         ([], "adapter_names is empty"), (["nope"], "adapter_names: 'nope'"),
                                         (None, "adapter_names must be a sequence")])
def test_mixed_adapters_arguments(lora_model, names, match):
    snap = snapshot(lora_model)
    with pytest.raises((ValueError, TypeError), match=match):
        ptune_rt.mixed_adapters(lora_model, names)
    assert_unchanged(lora_model, snap)


ENTRY_CALLS = [
    (lambda m, d: ptune_rt.save_adapter(m, d, adapter_name=5), "adapter_name must be None or a non-empty str"),
    (lambda m, d: ptune_rt.save_adapter(m, 5), "path must be a str or os.PathLike"),
    (lambda m, d: ptune_rt.save_adapter(m, d, format=["peft"]), "format must be one of"),
    (lambda m, d: ptune_rt.save_adapter(m, d, task_type=3), "task_type must be"),
    (lambda m, d: ptune_rt.save_adapter(m, d, modules_to_save=[3]), "modules_to_save must be"),
    (lambda m, d: ptune_rt.load_adapter(m, d, adapter_name=[]), "adapter_name must be None or a non-empty str"),
    (lambda m, d: ptune_rt.load_adapter(m, None), "path must be a str or os.PathLike"),
    (lambda m, d: ptune_rt.load_adapter(m, d, backend=1), "backend must be None or one of"),
    (lambda m, d: ptune_rt.set_adapter(m, 5), "adapter_name must be a str"),
    (lambda m, d: ptune_rt.apply(m, {"r": 4}), "config must be"),
    (lambda m, d: m.model.layers[0].self_attn.q_proj.add_adapter("b", 4, NAN), "alpha must be"),
    (lambda m, d: m.model.layers[0].self_attn.q_proj.add_adapter("b", "4", 8.0), "r must be"),
    (lambda m, d: m.model.layers[0].self_attn.q_proj.add_adapter("b", 4, 8.0, dropout="0"), "dropout must be"),
    (lambda m, d: m.model.layers[0].self_attn.q_proj.add_adapter(3, 4, 8.0), "adapter name must be"),
]


@pytest.mark.parametrize("call,match", ENTRY_CALLS, ids=[m for _, m in ENTRY_CALLS])
def test_entry_point_arguments(lora_model, tmp_path, call, match):
    d = tmp_path / "ckpt"
    ptune_rt.save_adapter(lora_model, d)
    snap = snapshot(lora_model)
    with pytest.raises((ValueError, TypeError), match=match):
        call(lora_model, d)
    assert_unchanged(lora_model, snap)

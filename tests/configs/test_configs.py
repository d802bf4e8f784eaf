"""Every config loads; the paper-sized Transfusion has the paper's parameter count
and its train step lowers for a mesh of 8 fake devices."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from unimm import objectives
from unimm.train.trainer import Trainer

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("path", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_config_builds_its_objective(path):
    config = load(path)
    assert config.objective in objectives.names()
    assert f"--config=configs/{path}.py" in (CONFIGS / f"{path}.py").read_text()  # the exact command
    objectives.build(config, shapes_only=True)


def _param_counts(config):
    """(all parameters, transformer only: decoder + embedding + LM head)."""
    obj = objectives.build(config, shapes_only=True)
    model = nnx.eval_shape(lambda: obj.make_model(nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return count(state), count({k: v for k, v in state.items() if k in ("decoder", "embed", "lm_head")})


def test_7b_has_seven_billion_parameters():
    total, transformer = _param_counts(load("transfusion_7b"))
    assert abs(total - 7e9) / 7e9 <= 0.05, total  # with U-Net blocks and the KL-VAE
    assert abs(transformer - 6.74e9) / 6.74e9 <= 0.01, transformer  # Llama-2-7B's count


@pytest.mark.parametrize("size, billions", [("160m", 0.16), ("370m", 0.37), ("760m", 0.76), ("1.4b", 1.4)])
def test_smaller_paper_sizes_are_selectable(size, billions):
    _, transformer = _param_counts(load("transfusion", f"size={size}"))
    assert abs(transformer / 1e9 - billions) / billions <= 0.05, (size, transformer)


def test_benchmark_shape_has_25m_non_embedding_parameters():
    obj = objectives.build(load("transfusion_bench25m"), shapes_only=True)
    model = nnx.eval_shape(lambda: obj.make_model(nnx.Rngs(0)))
    decoder = nnx.to_pure_dict(nnx.state(model.decoder, nnx.Param))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder))
    assert abs(n - 25e6) / 25e6 <= 0.05, n


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown Transfusion size"):
        load("transfusion", "size=3b")


def test_7b_train_step_lowers_on_8_devices(devices, tmp_path):
    config = load("transfusion_7b")
    config.data.batch_size = 8
    tr = Trainer(config, tmp_path, devices=devices, shapes_only=True)
    assert dict(tr.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    state = tr.abstract_state()
    batch = {k: jax.ShapeDtypeStruct((8,) + s.shape, s.dtype, sharding=tr.batch_shardings[k])
             for k, s in tr.objective.example_spec().items()}
    lowered = tr.make_step(state).lower(state.params, state.opt_state, batch, jax.random.key(0))
    text = lowered.as_text()
    assert "fsdp" in text or "sharding" in text
    kernel = state.param_shardings["decoder"]["blocks"]["mlp"]["wi"]["kernel"]
    assert kernel.spec[1] == "fsdp"  # the embed dim of every kernel is split over the 8 devices


def test_showo_1b_has_phi_1_5_parameters():
    """Phi-1.5 has 1.42B parameters (its "1.3B" is the non-embedding count); the
    Show-o vocabulary adds 8192 image codes and 7 specials to Phi's 50,295 tokens."""
    config = load("showo_1b")
    total, transformer = _param_counts(config)
    assert abs(transformer - 1.42e9) / 1.42e9 <= 0.05, transformer
    obj = objectives.build(config, shapes_only=True)
    assert obj.vocab_size == 50295 + 8192 + 7 and obj.num_tokens == 256


def test_demos_train_on_one_object_scenes_by_category_name():
    from unimm.configs import common, showo, transfusion

    for c in (showo.tiny_config(), transfusion.tiny_config()):
        drawn = {k for k, w in zip(c.data.categories, c.data.weights) if w}
        assert drawn == {"single_object", "colors"}
    with pytest.raises(ValueError, match="not in data.categories"):
        common.only_categories(common.base_config().data, ("single_objects",))


def _docstring_commands(path: pathlib.Path) -> list[list[str]]:
    """The unimm commands a config file's docstring gives, as argv lists."""
    import ast
    import shlex

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = doc.replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("python -m unimm.")]


@pytest.mark.parametrize("path", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_docstring_command_parses_and_builds(path):
    """Each command a config's docstring gives: its config loads, every override
    names a real key of the right type, and the recipe builds from the result."""
    from absl import flags
    from ml_collections import config_flags

    commands = _docstring_commands(CONFIGS / f"{path}.py")
    assert commands, f"configs/{path}.py gives no command"
    root = CONFIGS.parent
    for argv in commands:
        config_args = [a.replace("--config=configs/", f"--config={root}/configs/") for a in argv
                       if a.startswith("--config")]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                        sys_argv=["unimm"] + config_args)
        fv(["unimm"] + config_args)
        config = fv.config
        for arg in config_args[1:]:  # every override took effect
            key, _, value = arg[len("--config."):].partition("=")
            node = config
            for part in key.split("."):
                node = node[part]
            shown = ",".join(map(str, node)) if isinstance(node, tuple) else str(node)
            assert shown == value, (arg, node)
        objectives.build(config, shapes_only=True)


def test_recipe_sections_take_their_defaults_from_the_recipes():
    """One owner per section's defaults: the Settings dataclasses and DecoderConfig."""
    import dataclasses as dc

    from unimm.configs import common, showo, transfusion
    from unimm.nn.transformer import DecoderConfig
    from unimm.objectives import settings
    from unimm.objectives import showo as showo_obj
    from unimm.objectives import transfusion as tf_obj

    model = {k: v for k, v in dc.asdict(DecoderConfig()).items() if k != "cond_dim"}
    for module, cls in ((transfusion, tf_obj.Settings), (showo, showo_obj.Settings)):
        c = module.recipe_sections(common.base_config())
        for name, section in settings.sections(cls).items():
            got = {k: v for k, v in c[name].items() if k != "autoencoder"}
            assert got == section.to_dict(), name
        assert {k: v for k, v in c.model.items() if k != "qk_norm"} == {k: v for k, v in model.items()
                                                                         if k != "qk_norm"}


def test_showo_1b_is_phi_1_5_block_for_block():
    """Phi-1.5's 1,208,504,320 non-embedding parameters, plus Show-o's QK LayerNorms."""
    from unimm.nn.transformer import DecoderConfig

    config = load("showo_1b")
    dcfg = DecoderConfig.from_config(config.model)
    assert dcfg.block == "phi" and dcfg.rotary_dim == 32 and dcfg.mlp_dim == 8192 and dcfg.head_bias
    assert dcfg.num_params() == 1_208_504_320 + 24 * 4 * 64
    obj = objectives.build(config, shapes_only=True)
    model = nnx.eval_shape(lambda: obj.make_model(nnx.Rngs(0)))
    decoder = nnx.to_pure_dict(nnx.state(model.decoder, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder)) == dcfg.num_params()
    assert model.lm_head.bias is not None


def test_paper_configs_follow_the_papers():
    tf7b = objectives.build(load("transfusion_7b"), shapes_only=True)
    assert tf7b.s.text_ratio == 0.5 and tf7b.s.pack_length == 4096 and tf7b.packing() is not None
    assert tf7b.s.sampler == "ddpm" and tf7b.s.sample_steps == 250 and tf7b.s.timestep_spacing == "leading"
    assert tf7b.s.clip_x0 and tf7b.s.prediction == "eps" and tf7b.s.diffusion_weight == 5.0
    so = objectives.build(load("showo_1b"), shapes_only=True)
    assert (so.s.t2i_loss_weight, so.s.mmu_loss_weight, so.s.lm_loss_weight) == (1.0, 1.0, 0.1)
    assert so.s.confidence_noise == 1.0 and so.s.sample_temperature == 1.0 and so.s.sample_steps == 16
    assert so.s.guidance_scale == 1.75

"""The shipped recipes: every one loads, and each recipe that claims a paper's setting equals the
official scripts' values (recipes/paper/official.yaml), after `base:` and the method's defaults."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fasttrain.recipe import load_recipe, objective

PAPER = REPO / "recipes" / "paper"
OFFICIAL = yaml.safe_load((PAPER / "official.yaml").read_text())


def effective(recipe, key: str):
    """A dotted key's value as the run uses it: the loss's temperatures after the method's defaults."""
    if key in ("loss.temperature", "loss.base_temperature"):
        return getattr(objective(recipe), key.split(".")[1])
    value = recipe.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")
                                        if not p.name.startswith("_") and p.name != "official.yaml"), ids=str)
def test_every_shipped_recipe_loads(path):
    assert load_recipe(REPO / path).method


def test_every_paper_recipe_has_its_official_table_and_a_row_in_the_docs():
    recipes = {p.name for p in PAPER.glob("*.yaml") if p.name != "official.yaml"}
    assert recipes == set(OFFICIAL)
    docs = (REPO / "docs" / "reproduce.md").read_text()
    assert all(f"recipes/paper/{name}" in docs for name in recipes)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_a_paper_recipe_follows_the_official_script(name):
    recipe = load_recipe(PAPER / name)
    table = OFFICIAL[name]
    assert table["paper"] and table["source"]
    differ = {key: (effective(recipe, key), want) for key, want in table["values"].items()
              if effective(recipe, key) != (list(want) if isinstance(want, tuple) else want)}
    assert not differ, f"{name}: recipe value vs official: {differ}"


# SelfCon Tables 1 and 2 as matrices: a cell's official values are the table's common ones updated by its
# dataset's, architecture's and method's; the cells that sit in recipes/paper/ itself are named here
TABLES = {"selfcon_table1": {("cifar100", "r18", "selfcon"): "selfcon_cifar100_r18.yaml",
                             ("cifar100", "r18", "supcon"): "supcon_cifar100_r18.yaml"},
          "selfcon_table2": {("imagenet", "r34", "selfcon"): "selfcon_imagenet_r34.yaml"}}
MATRIX = {name: yaml.safe_load((PAPER / name / "official.yaml").read_text()) for name in TABLES}
CELLS = [(name, (d, a, m)) for name, table in MATRIX.items()
         for d in table["paper"] for a in table["paper"][d] for m in table["paper"][d][a]]


def cell_recipe(table: str, cell) -> Path:
    elsewhere = TABLES[table].get(cell)
    return PAPER / elsewhere if elsewhere else PAPER / table / f"{'_'.join(cell)}.yaml"


@pytest.mark.parametrize("table,cell", CELLS, ids=lambda x: x if isinstance(x, str) else "_".join(x))
def test_every_cell_of_selfcon_tables_1_and_2_follows_the_official_scripts(table, cell):
    dataset, arch, method = cell
    matrix = MATRIX[table]
    common = matrix["ce"] if method == "ce" else matrix["represent"]
    want = {**common, **matrix["datasets"][dataset], **matrix["archs"][arch], **matrix["methods"][method]}
    recipe = load_recipe(cell_recipe(table, cell))
    assert recipe.method == method
    differ = {key: (effective(recipe, key), value) for key, value in want.items() if effective(recipe, key) != value}
    assert not differ, f"{table} {cell}: recipe value vs official: {differ}"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_a_table_has_one_recipe_and_one_docs_row_per_cell(table):
    cells = [cell for name, cell in CELLS if name == table]
    files = {p.name for p in (PAPER / table).glob("*.yaml") if not p.name.startswith("_") and p.name != "official.yaml"}
    assert files == {cell_recipe(table, cell).name for cell in cells if cell not in TABLES[table]}
    docs = (REPO / "docs" / "reproduce.md").read_text()
    for cell in cells:
        row = next((line for line in docs.splitlines() if str(cell_recipe(table, cell).relative_to(REPO)) in line
                    and "Table 3" not in line), "")
        assert MATRIX[table]["paper"][cell[0]][cell[1]][cell[2]] in row, f"{cell}: no docs row with the paper's number"


def test_the_conformance_check_sees_a_drift(tmp_path):
    drifted = tmp_path / "x.yaml"
    drifted.write_text(f"base: {PAPER / 'selfcon_cifar100_r18.yaml'}\noptim: {{exclude_bn_bias: true}}\n")
    recipe = load_recipe(drifted)
    assert effective(recipe, "optim.exclude_bn_bias") != OFFICIAL["selfcon_cifar100_r18.yaml"]["values"][
        "optim.exclude_bn_bias"]
    assert Path(drifted).is_file()


def test_each_method_defaults_to_its_official_temperatures():
    from fasttrain.methods import Objective, get_method
    temps = {m: (Objective(get_method(m)).temperature, Objective(get_method(m)).base_temperature)
             for m in ("supcon", "selfcon", "cds", "simclr", "mixco")}
    assert temps == {"supcon": (0.1, 0.07), "selfcon": (0.1, 0.07), "cds": (0.07, 0.07), "simclr": (0.5, 0.5),
                     "mixco": (0.5, 0.5)}
    assert Objective(get_method("mixco")).options["mix_temperature"] == 0.5
    assert Objective(get_method("simclr"), temperature=0.2).base_temperature == 0.2  # NT-Xent: no rescaling


def test_a_per_process_contrast_reads_no_other_process(monkeypatch):
    """loss.gather: false: each process's loss is the loss of its own batch, with no collective."""
    import torch
    import torch.nn.functional as F

    import fasttrain.losses as losses
    features = F.normalize(torch.randn(6, 2, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    alone = losses.supcon_loss(features, labels)
    monkeypatch.setattr(losses, "_world", lambda: (2, 1))  # as process 1 of 2
    monkeypatch.setattr(losses.dist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reduced")))
    assert losses.supcon_loss(features, labels, gather=False) == alone
    with pytest.raises(Exception):  # the gathering form does need the other process
        losses.supcon_loss(features, labels, gather=True)


def test_linear_evaluation_steps_at_its_milestones():
    from fasttrain.engine.linear_eval import _factor
    from fasttrain.recipe import LinearEvalConfig
    cfg = LinearEvalConfig(epochs=10, milestones=[6, 8], gamma=0.1)
    factors = [_factor(cfg, u, 100, 10) for u in range(100)]
    assert factors[59] == 1 and factors[60] == pytest.approx(0.1) and factors[80] == pytest.approx(0.01)
    assert _factor(LinearEvalConfig(epochs=10), 50, 100, 10) == pytest.approx(0.5)  # the cosine by default


@pytest.mark.parametrize("overrides,message", [
    (["loader=ffcv", "data.augment=simclr"], "data.augment=simclr: loader=ffcv does not make the simclr augmentation"),
    (["loader=dali", "data.progressive={min_size: 160}"], "data.progressive: read only by loader=ffcv"),
    (["loader=torchvision", "data.progressive={min_size: 160}"], "data.progressive: read only by loader=ffcv"),
    (["loader=dali", "method=cds", "model.exits=[layer1]", "model.exit_kind=sepconv",
      "data.view_augments=[padcrop_cutout, padcrop_contrastive]"],
     "loader=dali does not make the padcrop_contrastive, padcrop_cutout augmentation"),
])
def test_a_backend_is_refused_at_load_time_what_it_cannot_make(overrides, message):
    from fasttrain.recipe import RecipeError
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / "demo_selfcon.yaml", overrides)

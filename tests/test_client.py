"""The real ClientApp, called with real Flower Messages: what it sends and what it keeps."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from peft import get_peft_model_state_dict

import client.client_app as client_app
from common.config import Settings, defaults
from common.privacy import Budget, epsilon, load_history, write_budget
from common.releases import REPLIES, eval_sensitivity
from common.data import catalog_fingerprint, write_catalog, write_interactions
from common.model import adapter_config, adapter_state, build_model, fingerprint, load_encoder, sequence_options

DECLARED_TRAIN_METRICS = {k.removeprefix("metrics.") for k in REPLIES["train"] if k.startswith("metrics.")}


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are created as the ServerApp would, so they need its task identity."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture()
def node(tmp_path, small_split):
    """A client data folder with 3 real users, and the node/run config pointing at it."""
    catalog, users, *_ = small_split
    data_dir = tmp_path / "site"
    write_catalog(catalog, data_dir / "catalog.csv")
    write_interactions([it for u in list(users)[:3] for it in users[u]], data_dir)
    write_budget(data_dir, Budget(8.0, 1e-5, declared_examples=64))
    run_config = {**defaults(), "model-layers": 2, "batch-size": 8, "local-steps": 2, "max-length": 64,
                  "history-len": 4, "run-dir": str(tmp_path / "run")}
    context = Context(run_id=1, node_id=7, node_config={"data-dir": str(data_dir)}, state=RecordDict(),
                      run_config=run_config)
    return catalog, users, data_dir, context


def server_message(catalog, run_config, server_round: int, kind: str = "train", arrays=None) -> Message:
    encoder, _ = load_encoder(run_config["model"], run_config["model-layers"])
    checks = {"base-sha256": fingerprint(encoder), "catalog-sha256": catalog_fingerprint(catalog),
              "server-round": server_round}
    if arrays is None:
        model = build_model(encoder, len(catalog), adapter_config(Settings.from_run_config(run_config), encoder))
        arrays = ArrayRecord(adapter_state(model))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(checks)})
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_reply_holds_only_adapter_tensors_and_declared_metrics(node, settings):
    catalog, users, data_dir, context = node
    reply = client_app.app(server_message(catalog, context.run_config, 1), context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent = reply.content["arrays"].to_torch_state_dict()

    # Names and count equal the PEFT model's trainable parameters, nothing else.
    encoder, _ = load_encoder(settings.model, 2)
    reference = build_model(encoder, len(catalog), adapter_config(settings, encoder))
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert len(sent) == len(trainable) == len(get_peft_model_state_dict(reference))
    assert set(sent) == set(get_peft_model_state_dict(reference))
    assert all("lora_" in n or ".scorer." in n for n in sent)
    base_numel = sum(p.numel() for p in encoder.parameters())
    assert sum(t.numel() for t in sent.values()) < 0.01 * base_numel

    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == DECLARED_TRAIN_METRICS
    assert all(isinstance(v, (int, float)) or all(isinstance(x, (int, float)) for x in v) for v in metrics.values())
    # The accountant history it reports is the one it keeps: this round's DP-SGD release at the
    # public q = batch-size / declared-examples, then the noisy example count.
    assert metrics["sample-rate"] == 8 / 64
    assert metrics["history-steps"] == [metrics["steps"], 1]
    assert metrics["history-noise-multiplier"] == [metrics["noise-multiplier"], metrics["count-noise-multiplier"]]
    assert metrics["history-sample-rate"] == [8 / 64, 1.0]
    assert metrics["num-examples"] != int(metrics["num-examples"])  # the count is noisy
    # No text anywhere in the reply: no title of the client's history, no history text.
    blob = b"".join(t.numpy().tobytes() for t in sent.values()) + repr(dict(metrics)).encode()
    history = users[next(iter(users))]
    for needle in [catalog.items[catalog.index[history[0].item_id]].title, "Rated"]:
        assert needle.encode() not in blob


def test_model_loaded_once_per_process_and_epsilon_grows(node):
    catalog, _, data_dir, context = node
    loads_before = client_app.MODEL_LOADS
    eps = []
    arrays = None
    for server_round in (1, 2):
        reply = client_app.app(server_message(catalog, context.run_config, server_round, arrays=arrays), context)
        assert not reply.has_error(), reply.error
        arrays = reply.content["arrays"]
        eps.append(reply.content["metrics"]["epsilon"])
    assert client_app.MODEL_LOADS - loads_before <= 1  # at most the first call loaded it
    assert eps[1] > eps[0] > 0
    assert (data_dir / "state" / "accountant.json").is_file()


def test_evaluate_is_a_charged_dp_release_of_the_splits_asked_for(node):
    """A deployed site sends only noisy sums (no exact figure) and charges them, each time asked:
    the validation split's by default, both splits' when the server asks for ``val,test``. A
    request for anything else is refused as a request error, and nothing is spent on it."""
    catalog, _, data_dir, context = node
    listed = {k for k, f in REPLIES["evaluate"].items() if f.status != "simulation"}
    without_test = {k for k in listed if not (REPLIES["evaluate"][k].per_split and not k.startswith("metrics.val-"))}
    eps = []
    for splits, expected in ((None, without_test), ("val,test", listed)):
        message = server_message(catalog, context.run_config, 1, kind="evaluate")
        if splits:
            message.content["config"]["splits"] = splits
        reply = client_app.app(message, context)
        assert not reply.has_error(), reply.error
        m = reply.content["metrics"]
        assert {f"metrics.{k}" for k in m.keys()} == expected
        eps.append(m["epsilon"])
    sigma = context.run_config["eval-noise-multiplier"]
    assert load_history(data_dir / "state") == [(sigma, 1.0, 1), (sigma, 1.0, 1)]
    assert 0 < eps[0] < eps[1] == pytest.approx(epsilon(load_history(data_dir / "state"), 1e-5, "prv"))
    assert m["count"] != 3 and abs(m["count"] - 3) < 6 * sigma * eval_sensitivity(2)
    for bad in ("train", "val,val", ""):
        message = server_message(catalog, context.run_config, 1, kind="evaluate")
        message.content["config"]["splits"] = bad
        with pytest.raises(client_app.SiteError, match=r"site error \(request\)"):
            client_app.app(message, context)
    assert len(load_history(data_dir / "state")) == 2


def test_base_model_mismatch_is_refused(node):
    catalog, _, _, context = node
    msg = server_message(catalog, context.run_config, 1)
    msg.content["config"]["base-sha256"] = "0" * 64
    with pytest.raises(client_app.SiteError, match=r"site error \(mismatch\)"):
        client_app.app(msg, context)


def test_popularity_query_sends_noisy_counts_and_charges_the_accountant(node):
    catalog, users, data_dir, context = node
    msg = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="query.popularity")
    reply = client_app.app(msg, context)
    sent = reply.content["arrays"].to_torch_state_dict()
    assert list(sent) == ["counts"] and sent["counts"].shape == (len(catalog),)
    true_total = sum(len(h) - 3 for h in list(users.values())[:3])  # training targets of the 3 users
    sigma = context.run_config["prior-noise-multiplier"]
    # Noise really was added: every count is off the integer grid, and the total is within 6σ√n.
    assert (sent["counts"] != sent["counts"].round()).all()
    assert abs(sent["counts"].sum().item() - true_total) < 6 * sigma * len(catalog) ** 0.5
    history = load_history(data_dir / "state")
    assert history[-1] == (sigma, 1.0, 1)
    assert reply.content["metrics"]["epsilon"] == pytest.approx(epsilon(history, 1e-5, "prv"))


@pytest.mark.parametrize("where", ["budget.json", "node-config"])
def test_a_round_over_budget_is_declined_before_any_training(node, where):
    catalog, _, data_dir, context = node
    if where == "budget.json":
        write_budget(data_dir, Budget(0.5, 1e-5, declared_examples=64))
    else:  # the node's own config wins over the file
        context.node_config.update({"epsilon-max": 0.5, "delta": 1e-6, "declared-examples": 64})
    reply = client_app.app(server_message(catalog, context.run_config, 1), context)
    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content  # no update at all
    reason = str(reply.content["decline"]["reason"])
    assert "over epsilon-max 0.5" in reason and "budget" in reason
    m = reply.content["metrics"]
    assert m["declined"] == 1 and m["epsilon"] == 0.0 and m["epsilon-max"] == 0.5
    assert m["delta"] == (1e-5 if where == "budget.json" else 1e-6)
    assert not (data_dir / "state" / "accountant.json").exists()  # nothing was spent


def test_a_client_uses_its_own_delta_not_the_servers(node):
    catalog, _, data_dir, context = node
    write_budget(data_dir, Budget(8.0, 1e-7, declared_examples=64))
    context.run_config["delta"] = 0.5  # what a server might ask for; the client ignores it
    reply = client_app.app(server_message(catalog, context.run_config, 1), context)
    m = reply.content["metrics"]
    assert m["delta"] == 1e-7
    assert m["epsilon"] == pytest.approx(epsilon(load_history(data_dir / "state"), 1e-7, "prv"))


def test_a_client_with_a_budget_refuses_a_run_without_dp(node):
    catalog, _, _, context = node
    context.run_config["dp"] = False
    reply = client_app.app(server_message(catalog, context.run_config, 1), context)
    assert "dp = false" in str(reply.content["decline"]["reason"])


def test_missing_budget_names_the_file_and_the_fix(node):
    catalog, _, data_dir, context = node
    (data_dir / "budget.json").unlink()
    with pytest.raises(client_app.SiteError, match=r"site error \(budget\)") as raised:
        client_app.app(server_message(catalog, context.run_config, 1), context)
    assert "budget.json" not in str(raised.value)  # the server learns the category only
    log = (data_dir / "state" / "errors.log").read_text()
    assert "site/budget.json: no privacy budget" in log and "epsilon-max" in log


RESTART_SCRIPT = """
import json, sys
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
import client.client_app as client_app
from tests.test_client import server_message
from common.data import read_catalog
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
run_config, data_dir, server_round = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
context = Context(run_id=1, node_id=7, node_config={"data-dir": data_dir}, state=RecordDict(), run_config=run_config)
reply = client_app.app(server_message(read_catalog(data_dir + "/catalog.csv"), run_config, server_round), context)
m = reply.content["metrics"]
print(json.dumps({"epsilon": m["epsilon"], "sample-rate": m["sample-rate"], "steps": m["steps"]}))
"""


def test_a_restarted_client_continues_its_epsilon(node):
    """Two separate processes, one round each: the second starts from the first's accountant."""
    import json
    import subprocess
    import sys

    from opacus.accountants import PRVAccountant

    from common.config import PROJECT_DIR

    _, _, data_dir, context = node
    outputs = []
    for server_round in (1, 2):
        done = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, json.dumps(context.run_config), str(data_dir),
                               str(server_round)], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    fresh = PRVAccountant()
    for out in outputs:
        fresh.history.append((context.run_config["noise-multiplier"], out["sample-rate"], out["steps"]))
        fresh.history.append((context.run_config["count-noise-multiplier"], 1.0, 1))
    assert outputs[1]["epsilon"] > outputs[0]["epsilon"] > 0
    assert outputs[1]["epsilon"] == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)


def fields(reply: Message) -> set[str]:
    from common.releases import fields_of

    return fields_of(reply.content)


def test_every_reply_kind_carries_exactly_its_listed_fields(node, monkeypatch):
    """The real ClientApp's train, prior, evaluate, price, decline and error replies against
    common/releases.py; a field that is not listed never leaves the site."""
    catalog, _, data_dir, context = node
    assert all(f.status in ("dp", "public", "simulation") and f.why for kind in REPLIES.values() for f in kind.values())
    train = client_app.app(server_message(catalog, context.run_config, 1), context)
    assert fields(train) == set(REPLIES["train"])
    prior = client_app.app(Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=7,
                                   message_type="query.popularity"), context)
    assert fields(prior) == set(REPLIES["prior"])
    final_round = server_message(catalog, context.run_config, 1, kind="evaluate")
    final_round.content["config"]["splits"] = "val,test"  # every split: every evaluate field a deployed site sends
    evaluation = client_app.app(final_round, context)
    assert fields(evaluation) == {k for k, f in REPLIES["evaluate"].items() if f.status != "simulation"}
    price = client_app.app(Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=7,
                                   message_type="query.price"), context)
    assert fields(price) == set(REPLIES["price"])
    write_budget(data_dir, Budget(0.01, 1e-5, declared_examples=64))
    declined = client_app.app(server_message(catalog, context.run_config, 2), context)
    assert fields(declined) == set(REPLIES["decline"])
    history = load_history(data_dir / "state")
    priced = client_app.app(Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=7,
                                    message_type="query.price"), context)
    assert fields(priced) == set(REPLIES["decline"])  # a SecAgg+ round is declined before it starts...
    assert load_history(data_dir / "state") == history  # ...and asking the price costs nothing
    # A reply that would carry an unlisted field is refused at the site (fail closed) ...
    write_budget(data_dir, Budget(100.0, 1e-5, declared_examples=64))
    real_identity = client_app.identity
    monkeypatch.setattr(client_app, "identity", lambda *a: {**real_identity(*a), "user-count": 3})
    with pytest.raises(client_app.SiteError, match=r"site error \(internal\)"):
        client_app.app(server_message(catalog, context.run_config, 3), context)
    assert "user-count" in (data_dir / "state" / "errors.log").read_text()
    # ... and a server would drop it too.
    from server.validation import check_train_reply

    train.content["metrics"]["user-count"] = 3
    sent = server_message(catalog, context.run_config, 1).content["arrays"].to_torch_state_dict()
    assert "undeclared field(s) ['metrics.user-count']" in check_train_reply(train.content, sent, 100.0)


def test_a_crafted_adapter_buys_only_charged_noisy_evaluations(node):
    """A server crafts the item bias so that a chosen half of the catalog ranks first, and asks
    for evaluations again and again: every answer is a charged Gaussian release (no exact
    figure, ε grows each time) and the site declines once its budget cannot pay for another."""
    catalog, _, data_dir, context = node
    sigma = context.run_config["eval-noise-multiplier"]
    one = epsilon([(sigma, 1.0, 1)], 1e-5, "prv")
    write_budget(data_dir, Budget(epsilon([(sigma, 1.0, 1)] * 3, 1e-5, "prv") * (1 + 1e-9), 1e-5,
                                  declared_examples=64))
    message = server_message(catalog, context.run_config, 1, kind="evaluate")
    state = message.content["arrays"].to_torch_state_dict()
    (bias,) = [k for k in state if k.endswith("scorer.bias")]
    state[bias] = torch.where(torch.arange(len(catalog)) % 2 == 0, 100.0, -100.0)
    crafted = ArrayRecord(state)
    answers = []
    for _ in range(4):
        reply = client_app.app(server_message(catalog, context.run_config, 1, kind="evaluate", arrays=crafted),
                               context)
        assert not reply.has_error(), reply.error
        answers.append(reply.content)
    charged = [a["metrics"] for a in answers[:3]]
    assert all(not any(k.startswith("exact-") for k in m) for m in charged)
    assert [round(m["epsilon"] / one, 6) for m in charged][0] == 1.0
    assert charged[0]["epsilon"] < charged[1]["epsilon"] < charged[2]["epsilon"]
    assert "decline" in answers[3] and "over epsilon-max" in str(answers[3]["decline"]["reason"])
    assert load_history(data_dir / "state") == [(sigma, 1.0, 1)] * 3  # the refusal spent nothing
    # The three answers about the same users and the same adapter differ: fresh noise each time.
    assert len({m["val-sum-hr@10"] for m in charged}) == 3


@pytest.mark.parametrize("events", [1, 2])
def test_a_site_with_no_evaluable_user_answers_evaluate_cleanly(tmp_path, small_split, events):
    """Users with fewer than 3 events have no validation or test event: the site still answers,
    with noisy zero sums, charged like any evaluation. With one event each there is nothing to
    train on either: a train request gets the "data" error category, and nothing is spent."""
    catalog, users, *_ = small_split
    data_dir = tmp_path / "site"
    write_catalog(catalog, data_dir / "catalog.csv")
    write_interactions([it for u in list(users)[:3] for it in users[u][:events]], data_dir)
    write_budget(data_dir, Budget(8.0, 1e-5, declared_examples=64))
    run_config = {**defaults(), "model-layers": 2, "max-length": 64, "history-len": 4, "batch-size": 8,
                  "local-steps": 2}
    context = Context(run_id=1, node_id=7, node_config={"data-dir": str(data_dir)}, state=RecordDict(),
                      run_config=run_config)
    reply = client_app.app(server_message(catalog, run_config, 1, kind="evaluate"), context)
    assert not reply.has_error(), reply.error
    assert load_history(data_dir / "state") == [(run_config["eval-noise-multiplier"], 1.0, 1)]
    assert reply.content["metrics"]["val-count"] != 0.0  # noise on a zero count
    if events == 1:
        with pytest.raises(client_app.SiteError, match=r"site error \(data\)"):
            client_app.app(server_message(catalog, run_config, 2), context)
        assert len(load_history(data_dir / "state")) == 1


def test_a_user_level_site_samples_users_counts_users_and_refuses_to_mix_units(node):
    """privacy-unit = user: q = batch-size / declared-users, FedAvg's weight is the noisy number
    of users, the accountant records its unit; then an example-level request is declined (the
    two ε would not compose as one) and a site whose budget names a unit keeps to it."""
    catalog, _, data_dir, context = node
    # No limit and the RDP accountant: σ_n = 0.05 makes the noisy count readable (P[|N| > ½] < 1e-20).
    write_budget(data_dir, Budget(float("inf"), 1e-5, declared_examples=64, declared_users=4))
    context.run_config.update({"privacy-unit": "user", "batch-size": 2, "examples-per-user": 3,
                               "count-noise-multiplier": 0.05, "accountant": "rdp"})
    reply = client_app.app(server_message(catalog, context.run_config, 1), context)
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    assert m["sample-rate"] == 2 / 4 and m["history-sample-rate"] == [2 / 4, 1.0]
    assert round(m["num-examples"]) == 3 and m["num-examples"] != 3  # 3 users, noisy
    stored = json.loads((data_dir / "state" / "accountant.json").read_text())
    assert stored["privacy-unit"] == "user" and stored["unit"].startswith("user-level")

    context.run_config["privacy-unit"] = "example"
    reply = client_app.app(server_message(catalog, context.run_config, 2), context)
    assert "arrays" not in reply.content and "holds user-level releases" in str(reply.content["decline"]["reason"])
    assert len(load_history(data_dir / "state")) == 2  # nothing more was spent

    context.node_config["privacy-unit"] = "user"  # the site's own setting: user level only
    context.node_config["state-dir"] = str(data_dir / "fresh-state")
    reply = client_app.app(server_message(catalog, context.run_config, 3, kind="evaluate"), context)
    assert "user level only" in str(reply.content["decline"]["reason"])


@pytest.mark.parametrize("content", ['{"seed": "zz", "included": [true]}', '{"included": [true]}', "not json"])
def test_a_malformed_canary_file_stops_the_train_step_before_any_release(node, content):
    """A site's white-box canary file (gradient-canaries.json) that cannot be read is the site's
    data error: the server learns only the category, nothing is charged, and the site's own
    errors.log names the file and the form expected."""
    from client.train import GradientCanaries

    catalog, _, data_dir, context = node
    (data_dir / GradientCanaries.FILE).write_text(content)
    with pytest.raises(client_app.SiteError, match=r"site error \(data\)"):
        client_app.app(server_message(catalog, context.run_config, 1), context)
    assert not (data_dir / "state" / "accountant.json").exists()
    (entry,) = [json.loads(line) for line in (data_dir / "state" / "errors.log").read_text().splitlines()]
    assert entry["category"] == "data" and "gradient-canaries.json: not a canary file" in entry["traceback"]
    assert '"included": [true, false, ...]' in entry["traceback"]


def test_a_deployed_site_reads_the_catalogs_embeddings_the_previous_process_computed(node, monkeypatch):
    """Flower starts a new ClientApp process per message, and a round's evaluate and the next
    round's train carry the same global adapter: the second process reads the catalog's
    embeddings the first computed (the same to the bit) instead of encoding the catalog again.
    A new adapter, or a damaged file, is encoded again. The users' texts' frozen-prefix states a
    process computed are read by the next one, not computed again."""
    catalog, _, data_dir, context = node
    context.run_config["lora-layers"] = 1  # layer 0 frozen and LoRA-free: its states are cached
    encoded = []
    real_refresh = client_app.refresh_item_embeddings
    monkeypatch.setattr(client_app, "refresh_item_embeddings", lambda *a, **k: (encoded.append(1), real_refresh(*a, **k)))

    def in_a_new_process(message):
        client_app._MODELS.clear()  # what a new process starts with
        reply = client_app.app(message, context)
        assert not reply.has_error(), reply.error
        (entry,) = client_app._MODELS.values()
        in_a_new_process.cache = entry["model"].get_base_model().prefix_cache
        return reply, entry["model"].get_base_model().item_embeddings.clone()

    initial = server_message(catalog, context.run_config, 1).content["arrays"]
    _, evaluated = in_a_new_process(server_message(catalog, context.run_config, 1, "evaluate", arrays=initial))
    files = list((data_dir / "state" / "prefix-cache").glob("items-*.pt"))
    assert len(files) == 1 and len(encoded) == 1
    reply, trained_with = in_a_new_process(server_message(catalog, context.run_config, 2, arrays=initial))
    assert len(encoded) == 1 and torch.equal(trained_with, evaluated)
    (texts_file,) = (data_dir / "state" / "prefix-cache").glob("texts-*.pt")
    saved = torch.load(texts_file)
    kept = dict(zip(map(tuple, saved["keys"]), saved["states"]))
    assert kept and not {text for text, _ in kept} & set(catalog.texts())  # the users' texts only
    trainer = in_a_new_process.cache
    assert all(torch.equal(state, trainer.states[key]) for key, state in kept.items())
    in_a_new_process(server_message(catalog, context.run_config, 2, "evaluate", arrays=reply.content["arrays"]))
    assert len(encoded) == 2 and len(list(files[0].parent.glob("items-*.pt"))) == 2
    evaluator = in_a_new_process.cache  # started with the trainer's states, computed only others
    users_texts = {key for key in evaluator.states if key[0] not in set(catalog.texts())}
    assert set(kept) <= users_texts and evaluator.misses == len(users_texts - set(kept))
    files[0].write_bytes(b"not a tensor")
    _, again = in_a_new_process(server_message(catalog, context.run_config, 3, arrays=initial))
    assert len(encoded) == 3 and torch.equal(again, evaluated)


def test_a_sequence_trained_site_encodes_the_catalog_once_whatever_the_tower_does(node, monkeypatch):
    """The catalog's embeddings depend on the encoder's LoRA alone. Trained on sequences (here a
    user-level DP-SGD round through the real ClientApp), LoRA never moves, so a process encodes
    the catalog once however the tower changes; the reply's LoRA is the global one, to the bit,
    and its tower is not."""
    catalog, _, data_dir, context = node
    write_budget(data_dir, Budget(8.0, 1e-5, declared_examples=64, declared_users=4))
    context.run_config.update({"sequence-training": True, "sequence-length": 6, "sequence-dim": 8,
                               "privacy-unit": "user", "batch-size": 2})
    encoded = []
    real_refresh = client_app.refresh_item_embeddings
    monkeypatch.setattr(client_app, "refresh_item_embeddings", lambda *a, **k: (encoded.append(1), real_refresh(*a, **k)))
    s = Settings.from_run_config(context.run_config)
    encoder, _ = load_encoder(s.model, s.model_layers)
    initial = ArrayRecord(adapter_state(build_model(encoder, len(catalog), adapter_config(s, encoder),
                                                    **sequence_options(s))))
    client_app._MODELS.clear()
    trained = client_app.app(server_message(catalog, context.run_config, 1, arrays=initial), context)
    assert not trained.has_error() and "arrays" in trained.content, trained.content
    sent, start = trained.content["arrays"].to_torch_state_dict(), initial.to_torch_state_dict()
    assert any(not torch.equal(sent[k], start[k]) for k in sent if ".sequence." in k)
    assert all(torch.equal(sent[k], start[k]) for k in sent if "lora_" in k)
    evaluated = client_app.app(server_message(catalog, context.run_config, 1, "evaluate",
                                              arrays=trained.content["arrays"]), context)
    assert not evaluated.has_error(), evaluated.error
    assert len(encoded) == 1


def test_a_site_shares_its_noise_only_inside_secagg_and_only_if_it_chose_to(node):
    catalog, _, data_dir, context = node
    context.run_config.update({"distributed-noise": True, "secure-aggregation": True, "local-steps": 1})
    price = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="query.price")
    declined = client_app.app(price, context)  # its budget names no distributed-noise-max-sites
    assert "distributed-noise-max-sites" in str(declined.content["decline"]["reason"])
    write_budget(data_dir, Budget(8.0, 1e-5, declared_examples=64, distributed_noise_max_sites=5))
    assert "decline" not in client_app.app(price, context).content
    history = load_history(data_dir / "state")
    # A plain train request (no SecAgg+ around it) would make the server see a σ/√T share alone.
    with pytest.raises(client_app.SiteError, match=r"site error \(request\)"):
        client_app.app(server_message(catalog, context.run_config, 1), context)
    assert "outside SecAgg+" in (data_dir / "state" / "errors.log").read_text()
    assert load_history(data_dir / "state") == history  # nothing released, nothing charged

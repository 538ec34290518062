"""SpaFL as a Flower app: your model, `spafl_kernels` and `flwr` only. Run: ``python examples/flower_spafl.py``.

The ServerApp sends the global thresholds to the sampled nodes and averages the thresholds they send
back; each ClientApp keeps its own sparse model in ``context.state`` across rounds. The same two apps
run on Flower's deployment engine (``flwr run``) when named in an app's pyproject.toml.
"""

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

import spafl_kernels as sk

ROUNDS, NODES, SAMPLE, EPOCHS = 5, 4, 2, 2


def my_model() -> nn.Module:
    torch.manual_seed(0)  # every client starts from the same weights, as in SpaFL
    return sk.sparsify(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                     nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4)))


def my_data(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """128 8x8 images of 4 classes (a bright quadrant each), noisier on higher partitions."""
    g = torch.Generator().manual_seed(partition)
    y = torch.randint(0, 4, (128,), generator=g)
    x = (0.5 + 0.1 * partition) * torch.randn(128, 1, 8, 8, generator=g)
    for k in range(4):
        x[y == k, :, 4 * (k // 2):4 * (k // 2) + 4, 4 * (k % 2):4 * (k % 2) + 4] += 1.0
    return x, y


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    model, (x, y) = my_model(), my_data(int(context.node_config["partition-id"]))
    last = sk.thresholds(model)
    if "model" in context.state:  # this node's own weights from its previous rounds
        model.load_state_dict(context.state["model"].to_torch_state_dict())
        last = context.state["last"].to_torch_state_dict()
    new = msg.content["thresholds"].to_torch_state_dict()
    sk.apply_threshold_update(model, {name: new[name] - last[name] for name in new})  # the global difference
    sk.load_thresholds(model, new)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.cat([torch.randperm(128) for _ in range(EPOCHS)]).split(16):
        opt.zero_grad()
        (F.cross_entropy(model(x[idx]), y[idx]) + 0.02 * sk.threshold_penalty(model)).backward()
        opt.step()
        sk.reset_collapsed(model)
    context.state["model"] = ArrayRecord(torch_state_dict=model.state_dict())
    context.state["last"] = ArrayRecord(torch_state_dict=new)
    with torch.no_grad():
        accuracy = float((model.eval()(x).argmax(1) == y).float().mean())
    metrics = MetricRecord({"accuracy": accuracy, "density": sk.density(model)["total"]})
    return Message(RecordDict({"thresholds": ArrayRecord(torch_state_dict=sk.thresholds(model)), "metrics": metrics}),
                   reply_to=msg)


server = ServerApp()
HISTORY: list[dict] = []


@server.main()
def main(grid: Grid, context: Context) -> None:
    global_thresholds = sk.thresholds(my_model())
    for r in range(1, ROUNDS + 1):
        nodes = sorted(grid.get_node_ids())
        sampled = [nodes[i] for i in torch.randperm(len(nodes))[:SAMPLE].tolist()]
        content = RecordDict({"thresholds": ArrayRecord(torch_state_dict=global_thresholds)})
        replies = [m for m in grid.send_and_receive(
            [Message(content, dst_node_id=node, message_type="train") for node in sampled]) if not m.has_error()]
        sent = [m.content["thresholds"].to_torch_state_dict() for m in replies]
        if sent:
            global_thresholds = {name: torch.stack([s[name] for s in sent]).mean(0) for name in global_thresholds}
        metrics = [m.content["metrics"] for m in replies]
        HISTORY.append({key: sum(m[key] for m in metrics) / max(len(metrics), 1) for key in ("accuracy", "density")})
        print(f"round {r}: {len(sent)}/{SAMPLE} replies, train accuracy {HISTORY[-1]['accuracy']:.3f}, "
              f"density {HISTORY[-1]['density']:.3f}")


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    run_simulation(server_app=server, client_app=client, num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})

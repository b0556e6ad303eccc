"""Made tests/data/v2/run.glb at commit 046ebdd, before training format 4: a format-2 governed run
through the user's own loop (6 steps of the digits MLP, shuffled loader, the user's
clip_grad_norm_ and an LR scheduler, so the steps carry a recipe and a varying lr; checkpoints
every 3), kept so that format-2 ledgers stay verifiable. Rerunning this script on a later commit
writes the newest format, not format 2. Run from the repository root."""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import torch
import test_trainer as tt
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
out = Path("tests/data/v2")
with tempfile.TemporaryDirectory() as d:
    led, ds = tt.new_ledger(Path(d) / "ledger")
    ds = tt.commit_dataset(led, tt.MANIFESTS, "digits-x", tt.WORLD.trainer, inputs=tt.X)
    model, opt, loader = tt.parts()
    engine = tt.engine_for(led, ds, model, order="loader")
    gm, gopt, gl = engine.make_governed(model, opt, loader)
    sched = torch.optim.lr_scheduler.StepLR(gopt, step_size=2, gamma=0.5)
    for step, (x, y) in zip(range(6), gl):
        gopt.zero_grad()
        loss = torch.nn.functional.cross_entropy(gm(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        gopt.step()
        sched.step()
    engine.close()
    export_bundle(led, out / "run.glb", with_data=True)
    write_public_keys(out / "roots.pub", [(tt.WORLD.root.public_key, "test root")])
    led.close()

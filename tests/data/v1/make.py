"""Made tests/data/v1/run.glb at commit edb68dd, before training format 2: a format-1 governed run
(6 steps of the digits MLP, checkpoints every 3), kept so that old ledgers stay verifiable. Rerunning
this script on a later commit writes the newest format, not format 1."""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import test_trainer as tt
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.training.dataset import commit_dataset
from gradledger.training.trainer import Trainer
out = Path("tests/data/v1")
with tempfile.TemporaryDirectory() as d:
    led = Ledger.create(Path(d) / "ledger")
    tt.genesis(led, tt.WORLD)
    led.append("CredentialIssued", {"credential": tt.CROWD_CRED.signed}, tt.WORLD.root)
    for cred in tt.WORKER_CREDS:
        led.append("CredentialIssued", {"credential": cred.signed}, tt.CROWD_KEY)
    led.commit()
    ds = commit_dataset(led, tt.MANIFESTS, "digits", tt.WORLD.trainer, inputs=tt.X)
    model, opt, loader = tt.parts()
    engine = tt.engine_for(led, ds, model, checkpoint_every=3)
    gm, gopt, gl = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gl, 6)
    export_bundle(led, out / "run.glb", with_data=True)
    write_public_keys(out / "roots.pub", [(tt.WORLD.root.public_key, "test root")])
    led.close()

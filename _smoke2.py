import torch, network
from utils.config import load_config
cfg = load_config(None)
torch.manual_seed(0)
model = network.build_model(cfg.model.name, 19, **cfg.model.options).eval()
x = torch.randn(2,3,64,96)
with torch.inference_mode():
    a = model.single_forward(x); b = model.single_forward(x[:1]); c = model.single_forward(x[1:])
    for k in a: print(k, torch.equal(a[k][:1], b[k]), torch.equal(a[k][1:], c[k]), (a[k][:1]-b[k]).abs().max().item())
    f = model.backbone if hasattr(model,'backbone') else None
    print(type(model).__mro__[:3])

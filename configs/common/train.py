# Training settings read by lazyconfig_train_net.py (detectron2's configs/common/train.py keys).
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=False),  # on CPU: bfloat16 autocast (gfocal/engine/amp.py)
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=10000, max_to_keep=100),
    eval_period=0,  # 0: evaluate once, after training
    log_period=20,
    device="cuda",
    seed=-1,
    # optimizer.lr and the warm-up are for 16 images per batch: lazyconfig_train_net.py scales them
    # to dataloader.train.total_batch_size (linear scaling rule; 0 uses them as written).
    reference_batch_size=16,
)

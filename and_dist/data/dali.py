"""`data.loader=dali`: NVIDIA DALI decodes and crops, on the GPU ("mixed" nvJPEG decoder) when the
run has CUDA, on DALI's CPU threads otherwise.

Why external_source instead of DALI's file reader: the reader shuffles and shards on its own and
returns labels, while a sample here must be a bank row and the epoch's order is the trainer's
sampler's. So each step this rank's planned files are read (one step ahead, in threads) and fed
with their crop boxes; DALI decodes just the box (ROI decoding) and resizes it. Colour, grayscale,
flip and normalisation follow on the training device (stream.StreamAugment), so DALI's output
is the same as the PIL loader's up to resampling.

Every file was opened once by index.py; formats DALI's decoder does not read (GIF, TIFF, ...) are
transcoded to PNG by PIL on the fly. DALI reads the format from the bytes, not the name, so
ImageNet's PNG named .JPEG, its CMYK and grayscale JPEGs decode to RGB as with PIL.
"""
from __future__ import annotations

import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .sources.folder import to_rgb
from .sources.index import FileIndex
from .stream import StepPlan, StreamData

DALI_FORMATS = ("JPEG", "PNG")   # fed as they are; anything else is transcoded to PNG first


def sample_bytes(index: FileIndex, i: int) -> np.ndarray:
    """The bytes of sample i as DALI's decoder gets them (index: a file index or a pack split)."""
    if index.format_of(i) in DALI_FORMATS:
        return np.frombuffer(index.read(i), dtype=np.uint8)
    buf = io.BytesIO()
    with Image.open(index.source(i)) as img:
        to_rgb(img).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def read_ahead(jobs: Iterator[tuple[object, list[Callable]]], threads: int) -> Iterator[tuple[object, list]]:
    """(tag, [read, ...]) -> (tag, [bytes, ...]); the next job's reads run while this one is used."""
    pending: deque = deque()
    with ThreadPoolExecutor(max(2, threads)) as pool:
        for tag, reads in jobs:
            pending.append((tag, [pool.submit(r) for r in reads]))
            if len(pending) > 1:
                tag0, futures = pending.popleft()
                yield tag0, [f.result() for f in futures]
        while pending:
            tag0, futures = pending.popleft()
            yield tag0, [f.result() for f in futures]


class DaliData(StreamData):
    """Streaming data interface whose decoding runs in DALI pipelines: one for training crops, one
    for evaluation images, each built once (the GPU decoder takes seconds to set up) and fed
    through a slot its source reads. A pass left unfinished drops its pipeline, so the next one
    never receives the stopped pass's prefetched batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipes: dict = {}
        self._feeds: dict = {}

    def _pipeline(self, train: bool):
        from nvidia.dali import fn, pipeline_def, types
        cuda = self.env.device.type == "cuda"
        decoder = "mixed" if cuda else "cpu"
        feeds = self._feeds       # not self: no reference cycle, the pipeline goes with its loader
        source = lambda: next(feeds[train])   # noqa: E731 - StopIteration ends DALI's pass
        batch = -(-self.batch_size // self.env.world) if train else self.eval_batch   # most rows per run

        @pipeline_def(batch_size=batch, num_threads=max(1, self.workers), prefetch_queue_depth=2,
                      device_id=self.env.device.index if cuda else None)
        def pipe():
            if train:
                enc, anchor, shape = fn.external_source(source=source, num_outputs=3, batch=True)
                x = fn.decoders.image_slice(enc, anchor, shape, device=decoder, output_type=types.RGB,
                                            adjust_orientation=False, axis_names="WH")
                return fn.resize(x, resize_x=self.size, resize_y=self.size, antialias=True,
                                 interp_type=types.INTERP_LINEAR)
            enc = fn.external_source(source=source, batch=True)
            x = fn.decoders.image(enc, device=decoder, output_type=types.RGB, adjust_orientation=False)
            x = fn.resize(x, resize_shorter=self.resize, antialias=True, interp_type=types.INTERP_LINEAR)
            return fn.crop(x, crop=(self.size, self.size))

        p = pipe()
        p.build()
        return p

    def _run(self, train: bool, feed: Iterator) -> Iterator[torch.Tensor]:
        """The pipeline's uint8 (b, S, S, 3) outputs for the batches of `feed`, on the device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        cuda = self.env.device.type == "cuda"
        pipe = self._pipes.pop(train, None) or self._pipeline(train)
        self._feeds[train] = feed
        try:
            while True:
                try:
                    (out,) = pipe.run()
                except StopIteration:           # the feed ran dry: keep the pipeline for the next pass
                    pipe.reset()
                    self._pipes[train] = pipe
                    return
                images = torch.empty((len(out), self.size, self.size, 3), dtype=torch.uint8, device=self.env.device)
                feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream() if cuda else None)
                yield images
        finally:
            self._feeds.pop(train).close()      # a pass left unfinished stops its reading threads now

    def _decode_train(self, plans: Iterator[StepPlan]) -> Iterator[tuple[StepPlan, torch.Tensor]]:
        index, pending = self.index["train"], deque()      # plans handed to the decoder, in order
        jobs = ((plan, [lambda i=i: sample_bytes(index, i) for i in plan.mine.tolist()]) for plan in plans)

        def feed():
            for plan, data in read_ahead(jobs, self.workers):
                pending.append(plan)
                boxes = plan.boxes.numpy()
                anchors = [np.array([b[1], b[0]], dtype=np.int32) for b in boxes]     # (x, y)
                shapes = [np.array([b[3], b[2]], dtype=np.int32) for b in boxes]      # (width, height)
                yield data, anchors, shapes

        for images in self._run(True, feed()):
            yield pending.popleft(), images

    def _decode_eval(self, index: FileIndex, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        jobs = ((None, [lambda i=i: sample_bytes(index, i) for i in c]) for c in chunks if c)
        yield from self._run(False, (data for _, data in read_ahead(jobs, self.workers)))

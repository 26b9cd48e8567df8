"""The API's vocabulary, each word list defined once.

Plain ``typing.Literal``s (no pydantic): the request and response models
(``requests.py``, ``responses.py``), the settings and models file (``settings.py``,
``models_file.py``), the imaging code,
the transport and the command line all take them from here, so a new method, format
or resize mode is one edit. The engine's CAM formulas must match ``METHODS`` (a test
keeps them equal).
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
METHODS: tuple[str, ...] = get_args(Method)
HeatmapFormat = Literal[
    "array", "png", "overlay", "gray", "none", "dicom-sc", "dicom-pm", "dicom-seg", "nifti"
]
# Formats that are no picture: an ``encoding`` has nothing to encode.
NO_PICTURE_FORMATS = ("array", "none", "dicom-pm", "dicom-seg", "nifti")
# DICOM objects of a DICOM source, on its pixel grid (imaging/dicom_out.py, dicom_seg.py).
DICOM_FORMATS = ("dicom-sc", "dicom-pm", "dicom-seg")
# A report per DICOM source image beside the heatmaps, whatever their format: a DICOM SR
# Measurement Report (TID 1500) of each explained class (imaging/dicom_sr.py).
ReportFormat = Literal["dicom-sr"]
HeatmapSize = Literal["original", "input", "layer"]
HeatmapEncoding = Literal["png", "jpeg", "webp"]
# Extras a result may carry on request: the picture heatmaps are drawn over (for
# clients that cannot decode the upload, DICOM above all) and a DICOM file's
# patient, study and display attributes; and each explanation's faithfulness (deletion
# and insertion curves, engine/faithfulness.py).
Include = Literal["image", "dicom", "faithfulness"]
# How an image is fitted to the model's input (imaging/geometry.py).
ResizeMode = Literal["stretch", "letterbox", "crop"]
# The resampling filter that fits an image to the model input (Pillow's, as timm and
# torchvision use on PIL images); a volume's: MONAI Resize's modes "area" (its default),
# "trilinear" and "nearest" (imaging/volume_fitting.py).
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "area", "trilinear"]
IMAGE_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
VOLUME_INTERPOLATIONS = ("area", "trilinear", "nearest")
# How the offset of a centre cut is rounded when the margin is odd: "round" half to
# even, as torchvision's CenterCrop (timm, most training code); "floor", as the
# Hugging Face image processors' center_crop. One pixel apart, it shifts the input.
CropOffset = Literal["round", "floor"]
# The order of a model's input channels: "bgr" for the Hugging Face processors that flip
# them (MobileViT's do_flip_channel_order, from its OpenCV-trained weights).
ChannelOrder = Literal["rgb", "bgr"]
# Where a models-file model comes from (engine/loading/libraries/); "torch.export": an
# archive written by torch.export.save, the model and its weights (contract/archives.py).
Library = Literal["torchvision", "timm", "transformers", "monai", "torch.export"]
# What computes a model's answers: float32, or bfloat16 autocast (engine/tuning.py).
Precision = Literal["fp32", "bf16"]
# How a model's activations are laid out in memory (engine/tuning.py).
MemoryFormat = Literal["contiguous", "channels_last"]
# How a layer's output holds its feature map (engine/layouts/): (N, C, H, W) as CNNs
# return it, (N, H, W, C) as a Swin does, or a sequence of patch tokens
# (N, prefix + H·W, C) as a ViT's. A shape, not a memory format (that is MemoryFormat).
# A volume model's layers return (N, C, D, H, W): "ncdhw".
LayerLayout = Literal["nchw", "nhwc", "tokens", "ncdhw"]
# The models file's ``layout``: "auto" (known by the model's types), or one layout
# declared for the whole model.
LayoutSetting = Literal["auto", "nchw", "nhwc", "tokens"]

# (x0, y0, x1, y1) in model-input pixels: the part of the input an image covers, when it
# does not cover all of it (letterbox); outside it the normalised input is 0. Fitted in
# imaging/geometry.py, carried by the engine's jobs (transport/interface.py).
Box = tuple[int, int, int, int]

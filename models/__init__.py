"""Bone-age model: network, preprocessing, Grad-CAM, checkpoints, training, evaluation.

Modules: ``net`` (BoneAgeNet, build_model), ``preprocess`` (prepare, cam_to_image),
``gradcam`` (predict_with_cam), ``checkpoint`` (safetensors format, model id),
``predictor`` (BoneAgePredictor, inference_copy), ``fused`` (the CPU trunk as fused oneDNN
convolutions), ``reference`` (Greulich–Pyle SD, SDS, age in months),
``phantoms`` (synthetic hands), ``data``/``train``/``evaluate`` (training tools).
Nothing here imports DICOM, database or task-queue code.
"""

# The released versions tests/interop runs (README "Works with"); setup_envs.sh installs them and
# the tests check that these are what they ran.
TORCH=2.13.0
FASTCHAT=0.2.36
LM_EVAL=0.4.13
LLAMAFACTORY=0.9.5
LLAMA_CPP_PYTHON=0.3.36

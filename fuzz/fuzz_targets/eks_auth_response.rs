#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pod_identity_agent_fuzz::eks_auth_response(data));

"""A session continued from its codes (issue: nothing stops the music): the new session starts as the server's
own re-prime would at that frame, its numbering continuing, over a real server on loopback."""

from __future__ import annotations

import numpy as np

from client import MusicGenClient
from musicgen.v1 import musicgen_pb2 as pb
from server_harness import collect

GREEDY = pb.Sampling(greedy=True, guidance_scale=3.0)
WINDOW = dict(context_frames=60, reprime_keep_frames=16)


def generate(mono_server, **fields):
    request = pb.GenerateRequest(request=pb.StartSession(prompt="warm lofi beat", sampling=GREEDY,
                                                         return_codes=True, chunk_frames=5, **WINDOW, **fields))
    return collect(mono_server.stub().Generate(request))


def resume_from(codes: np.ndarray, at_frame: int) -> pb.ResumeFrom:
    return pb.ResumeFrom(codes=codes.T.reshape(-1).tolist(), at_sample=at_frame * 640)


def test_a_resumed_session_gives_the_frames_of_the_servers_own_reprime_at_that_frame(mono_server):
    whole = generate(mono_server, duration_frames=100)  # re-primes at frame 60 (window 60), keeping 16 frames
    assert [n.frame for n in whole.of("notice") if n.kind == pb.NOTICE_KIND_CONTEXT_REPRIMED][0] == 60
    resumed = generate(mono_server, duration_frames=40, resume=resume_from(whole.codes[:, :60], 60))
    assert np.array_equal(resumed.codes, whole.codes[:, 60:100])
    started, chunks, finished = resumed.of("started")[0], resumed.of("audio"), resumed.of("finished")[0]
    assert started.first_sample == 60 * 640 and started.audio_prompt_frames == 0
    assert chunks[0].first_frame == 60 and chunks[0].start_sample == 60 * 640
    assert all(a.start_sample + a.sample_count == b.start_sample for a, b in zip(chunks, chunks[1:]))
    assert finished.total_frames == 40 and finished.total_samples == 40 * 640


def test_a_resumed_session_may_be_given_fewer_frames_than_the_window(mono_server):
    whole = generate(mono_server, duration_frames=80)  # both end at frame 80: the same end of sequence
    resumed = generate(mono_server, duration_frames=20, resume=resume_from(whole.codes[:, 30:60], 60))
    assert np.array_equal(resumed.codes, whole.codes[:, 60:80])  # the re-prime keeps only the last 16 anyway


def test_the_client_resumes_from_the_codes_it_received(mono_server):
    with MusicGenClient(mono_server.address) as client:
        first = client.generate("warm lofi beat", frames=30, sampling={"greedy": True}, return_codes=True,
                                chunk_frames=5)
        chunks = list(first)
        codes = np.concatenate([c.codes for c in chunks])  # (frames, codebooks)
        resumed = client.generate("warm lofi beat", frames=10, sampling={"greedy": True}, chunk_frames=5,
                                  resume_codes=codes, resume_at_sample=chunks[-1].end_sample)
        again = list(resumed)
    assert resumed.started.first_sample == 30 * 640
    assert again[0].start_sample == 30 * 640 and again[-1].end_sample == 40 * 640
    assert resumed.finished.total_samples == 10 * 640

"""Paraphrases of the synthetic MultiEYE's latent findings, for a larger concept bank.

:data:`PARAPHRASES` holds 12 sentences for each of the 8 findings of
:data:`multieye_dist.data.synth.FINDINGS` (same index order; the first of each group is the
finding's own caption). Each describes its finding only and reads well after "A fundus
photograph of ". They are encoded into ``configs/concepts/synth-paraphrases-minilm.safetensors``
(``benchmarks/make_findings_bank.py``), the K = 96 bank of the efficacy study's concept-bank-size
factor: K = 8 captions (``synth-findings-minilm.safetensors``) vs K = 96 paraphrases of the same
findings. That bank's ``concept_findings`` metadata maps each row to its finding's index.
"""

from __future__ import annotations

PARAPHRASES: tuple[tuple[str, ...], ...] = (
    (  # 0 drusen
        "drusen, small yellow deposits beneath the pigment epithelium",
        "multiple small yellow drusen at the macula",
        "yellowish sub-pigment-epithelial deposits known as drusen",
        "scattered hard drusen in the posterior pole",
        "soft confluent drusen under the retinal pigment epithelium",
        "round pale yellow spots of extracellular debris beneath the retina",
        "a cluster of tiny yellow dots in the macular region",
        "drusen lifting the retinal pigment epithelium into small domes",
        "numerous yellow-white drusen around the fovea",
        "discrete yellow flecks of drusen at the macula",
        "small yellow deposits between Bruch's membrane and the pigment epithelium",
        "macular drusen seen as faint yellow spots",
    ),
    (  # 1 subretinal fluid
        "subretinal fluid, a dome-shaped serous detachment",
        "a serous detachment of the neurosensory retina",
        "a grey round blister of subretinal fluid at the macula",
        "fluid collecting under the retina and lifting it into a dome",
        "a well-circumscribed serous retinal detachment",
        "a shallow blister of clear fluid beneath the macula",
        "subretinal fluid elevating the neurosensory retina",
        "a round greyish elevation from fluid under the retina",
        "a localised pocket of serous fluid below the retina",
        "a dome of subretinal fluid with a smooth sharp border",
        "a neurosensory detachment with clear fluid under the fovea",
        "a bubble-like serous elevation of the posterior retina",
    ),
    (  # 2 intraretinal haemorrhage
        "intraretinal haemorrhages, dark red dot and blot bleeding",
        "scattered dot and blot haemorrhages within the retina",
        "dark red blot haemorrhages in the retinal layers",
        "small red spots of bleeding inside the retina",
        "intraretinal bleeding seen as dark red blots",
        "multiple deep retinal haemorrhages, round and dark red",
        "blood within the retina forming dark red patches",
        "dot haemorrhages and larger blot bleeds across the fundus",
        "retinal haemorrhages, red blotches in the inner retina",
        "dark red intraretinal blood spots",
        "flame and blot shaped haemorrhages in the retina",
        "bleeding within the retinal tissue, scattered red blots",
    ),
    (  # 3 hard exudates
        "hard exudates, bright waxy lipid deposits in a ring",
        "a circinate ring of hard exudates",
        "bright yellow-white lipid exudates with sharp edges",
        "waxy yellow exudates arranged in a partial ring",
        "small shiny yellow-white dots of leaked lipid",
        "hard exudates, glistening yellow lipid plaques in the outer retina",
        "clusters of crisp yellow lipid deposits at the macula",
        "lipid exudation forming bright refractile yellow spots",
        "a ring of waxy exudates around a leaking area",
        "sharply demarcated bright yellow exudates",
        "yellow-white lipoprotein deposits in the outer plexiform layer",
        "scattered glistening hard exudates near the fovea",
    ),
    (  # 4 optic disc cupping
        "an enlarged optic disc cup with loss of the nerve fibre layer",
        "glaucomatous cupping of the optic disc",
        "a large pale cup in the optic disc",
        "an increased cup-to-disc ratio with a thin neuroretinal rim",
        "a deeply excavated optic nerve head",
        "optic disc cupping with thinning of the neuroretinal rim",
        "an enlarged and deepened optic cup",
        "a vertically elongated optic cup with notching of the rim",
        "nerve fibre layer loss around a cupped optic disc",
        "a cup-to-disc ratio of about 0.8",
        "an excavated optic disc with bayoneting of the vessels at the rim",
        "a pale, hollowed-out optic nerve head with a narrow rim",
    ),
    (  # 5 epiretinal membrane
        "an epiretinal membrane, a glistening cellophane sheen with surface wrinkling",
        "cellophane maculopathy with a shiny reflex over the macula",
        "a thin translucent membrane on the retinal surface",
        "a macular pucker with fine retinal striae",
        "a wrinkled whitish sheen over the macula",
        "an epiretinal membrane distorting the small vessels around it",
        "a glistening sheet of fibrous tissue on the inner retina",
        "fine radiating folds of the inner retinal surface",
        "a preretinal membrane with traction lines",
        "a semi-transparent film contracting the macular surface",
        "retinal surface wrinkling from a contracting membrane",
        "a cellophane-like light reflex with tortuous small vessels at the macula",
    ),
    (  # 6 choroidal neovascularisation
        "choroidal neovascularisation, a grey-green membrane of new vessels",
        "a grey-green subretinal neovascular membrane",
        "new vessels growing from the choroid under the retina",
        "a choroidal neovascular membrane with a dark red rim",
        "a greyish lesion of abnormal vessels beneath the macula",
        "a neovascular complex between the retina and the pigment epithelium",
        "a grey-green patch of choroidal new vessels with a dark rim",
        "subretinal new vessel growth forming a raised grey membrane",
        "an elevated grey-green lesion of choroidal new vessels",
        "a fibrovascular membrane under the macula",
        "abnormal choroidal vessels breaking through Bruch's membrane",
        "a greenish-grey neovascular lesion lifting the retina",
    ),
    (  # 7 myopic thinning
        "myopic thinning with a tessellated fundus and a posterior staphyloma",
        "a tessellated fundus with visible choroidal vessels",
        "a pale peripapillary crescent from high myopia",
        "a thin retina and choroid with a posterior staphyloma",
        "myopic chorioretinal thinning with a tigroid fundus",
        "a posterior staphyloma with backward bowing of the eye wall",
        "a tilted disc with a temporal myopic crescent",
        "choroidal vessel stripes showing through a thinned pigment epithelium",
        "a highly myopic fundus with diffuse thinning",
        "a tigroid pattern of choroidal vessels in a long eye",
        "thinning of the retina and choroid in pathological myopia",
        "a stretched myopic fundus with a pale crescent at the disc",
    ),
)


def paraphrase_sentences() -> tuple[list[str], list[int]]:
    """(sentences in row order, the finding index of each row): rows grouped by finding."""
    sentences = [s for group in PARAPHRASES for s in group]
    findings = [i for i, group in enumerate(PARAPHRASES) for _ in group]
    return sentences, findings
